"""Tokens never reach an output, a log record (any logger, any level), a card or an error line.

Issue 11, "Tokens shown": a token holding a newline came back whole in the
error line, and ``-v`` printed the HTTP client's DEBUG lines with response
headers echoing the token. The fake Hub here echoes a rejected token in its
401 body and in a response header, on purpose.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from checkpoints.cards import CardInfo, write_card
from checkpoints.errors import WeightsmithError
from checkpoints.hub import push_folder
from hub_fixtures import GOOD_TOKEN, fake_hub, hub_env, no_internet  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
# Well formed (printable ASCII, no spaces) but full of regex metacharacters, and not "hf_"-shaped,
# so only registration (not the hf_ pattern) can scrub it.
META_TOKEN = r"wsTok.+*?(a|b)[c]{2}$^\end|9"
THIRD_PARTY = ("httpx", "httpx2", "httpcore", "httpcore2", "urllib3", "huggingface_hub", "gradio", "filelock")


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    write_card(folder, CardInfo(title="out", relation="merge", base_models=["demo"], summary="A test folder."))
    return folder


def _forms(token: str) -> list[str]:
    """The token as a client could print it: raw, URL-quoted, base64 (whole, and as in Basic auth)."""
    raw = token.encode()
    return [token, quote(token, safe=""), quote_plus(token), base64.b64encode(raw).decode(),
            repr(raw)[2:-1], repr(token)[1:-1]]


class Capture:
    """Every log record created in the process, before (``raw``) and after (``seen``) redaction.

    ``seen`` is also what a DEBUG handler on the root and on every non-propagating
    logger printed, exception text included.
    """

    def __init__(self, monkeypatch) -> None:
        self.raw: list[str] = []
        self.handler_lines: list[str] = []
        try:
            from checkpoints import secrets
        except ImportError:  # the code before issue 11: nothing to install (the tests then show the leaks)
            secrets = None
        factory = logging.getLogRecordFactory()
        while secrets is not None and isinstance(factory, secrets._RedactingFactory):
            factory = factory.inner
        original = logging.getLogRecordFactory()
        monkeypatch.setattr(logging, "_logRecordFactory", original)

        def raw_capture(*args, **kwargs):
            record = factory(*args, **kwargs)
            try:
                self.raw.append(record.getMessage())
            except Exception:
                pass
            return record

        logging.setLogRecordFactory(raw_capture)  # restored by monkeypatch
        if secrets is not None:
            secrets.install_redaction()  # wraps raw_capture: handlers see the redacted record

        capture = self

        class Handler(logging.Handler):
            def emit(self, record):
                capture.handler_lines.append(self.format(record))

        self.handler = Handler(level=logging.DEBUG)
        self.handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        targets = [logging.getLogger()] + [logging.getLogger(n) for n in THIRD_PARTY]
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger) and not logger.propagate:
                targets.append(logger)
        self.targets = list(dict.fromkeys(targets))
        for logger in self.targets:
            monkeypatch.setattr(logger, "level", logging.DEBUG)
            logger.addHandler(self.handler)
        logging.getLogger().manager._clear_cache()

    def close(self) -> None:
        for logger in self.targets:
            logger.removeHandler(self.handler)
        logging.getLogger().manager._clear_cache()


@pytest.fixture
def capture(monkeypatch):
    cap = Capture(monkeypatch)
    yield cap
    cap.close()


def _assert_nowhere(token: str, texts: list[str]) -> None:
    for form in _forms(token):
        for text in texts:
            assert form not in text, (form, text[:300])


def _failed_push(hub_env, tmp_path: Path, token: str, starts: str):
    """Push a small folder with ``token``; it must fail with one line starting ``starts``."""
    with pytest.raises(WeightsmithError) as err:
        push_folder(_folder(tmp_path), "alice/leak", token=token)
    message = str(err.value)
    assert message.startswith(starts) and "\n" not in message, message
    return hub_env["hub"], message, err


def test_failed_push_401_leaks_token_nowhere_at_debug(hub_env, tmp_path, capture, capsys):
    hub, message, err = _failed_push(hub_env, tmp_path, META_TOKEN, "the Hub rejected the token (401)")
    logging.getLogger("weightsmith.test").debug("crafted: Authorization: Bearer %s", META_TOKEN)
    out, errs = capsys.readouterr()
    exc_text = "".join(traceback.format_exception(err.value))
    _assert_nowhere(META_TOKEN, [message, repr(err.value), exc_text, out, errs, *capture.handler_lines])
    # Non-vacuous: the token went to the server, the server echoed it back, and the HTTP client's DEBUG
    # records held it (in the response headers) before redaction; our crafted line did too.
    assert any(tok == META_TOKEN for _, _, tok in hub.requests)
    leaking = [r for r in capture.raw if any(form in r for form in _forms(META_TOKEN))]
    assert any("X-Echo-Authorization" in r for r in leaking), "the client never logged the echoed header"
    assert any(r.startswith("crafted:") for r in leaking)
    assert any("***" in line and "crafted" in line for line in capture.handler_lines)


@pytest.mark.parametrize("token", [
    "hf_Abcdefgh\nijklmnop0123456789",       # newline inside (the case)
    "hf_Abcdefgh ijklmnop0123456789",        # space inside
    "hf_Ab\tcdefghijklmnop0123456789",       # tab
    "hf_Abcdéfghijklmnop0123456789ü",        # non-ASCII
    "hf_Abcdefgh\x00ijklmnop0123456789",     # NUL
    "hf_" + "A" * 10000,                     # absurd length
    "hf_(a+)+$[x]\r\nSet-Cookie: evil=1",    # header injection with regex metacharacters
])
def test_malformed_token_refused_without_echo(hub_env, tmp_path, capture, capsys, token):
    hub, message, _ = _failed_push(hub_env, tmp_path, token, "the Hugging Face token is malformed (")
    pieces = [p for p in token.split() if len(p) >= 6] + [token, token.strip()]
    out, errs = capsys.readouterr()
    for text in (message, out, errs, *capture.handler_lines):
        for piece in pieces:
            assert piece not in text
    assert hub.requests == []  # refused before anything was sent
    # Non-vacuity: a well-formed token of the same kind is accepted by the check and reaches the Hub.
    with pytest.raises(WeightsmithError, match=r"401"):
        push_folder(tmp_path / "out", "alice/malformed", token="hf_Abcdefghijklmnop0123456789x")
    assert hub.requests


def test_redaction_scrubs_any_logger_args_and_exceptions(capture):
    from checkpoints.secrets import redact, register_secret  # new in issue 11

    token = "s3cr3t line1\nline2 (x+)*[y]$ ünï"
    register_secret(token)
    log = logging.getLogger("some.third.party")
    log.debug("header %r", token.encode())
    log.info("json %s", '{"t": "' + token.replace("\n", "\\n") + '"}')
    log.warning("url %s", quote(token, safe=""))
    try:
        raise RuntimeError(f"failed with {token}")
    except RuntimeError:
        log.exception("boom")
    joined = "\n".join(capture.handler_lines)
    assert "boom" in joined and "RuntimeError" in joined  # the records themselves survive
    for form in [token, "s3cr3t", "line2", repr(token.encode())[2:-1], quote(token, safe=""), "(x+)*[y]$"]:
        assert form not in joined
    assert redact(f"a {token} b") == "a *** b"
    # Non-vacuity: the records held the token before redaction.
    assert sum(("s3cr3t" in r) for r in capture.raw) >= 3


def test_token_in_a_card_is_refused_before_upload(hub_env, tmp_path):
    hub = hub_env["hub"]
    folder = _folder(tmp_path)
    (folder / "notes.md").write_text(f"pushed with {GOOD_TOKEN[:3]}{GOOD_TOKEN[3:]}\n")
    with pytest.raises(WeightsmithError, match=r"^notes\.md: holds a Hugging Face token"):
        push_folder(folder, "alice/card-token", token=GOOD_TOKEN)
    assert "alice/card-token" not in hub.repos
    (folder / "notes.md").write_text("clean\n")
    push_folder(folder, "alice/card-token", token=GOOD_TOKEN)  # non-vacuity: the clean folder goes through
    assert "notes.md" in hub.files("alice/card-token")


def test_cli_verbose_failed_push_never_prints_token(hub_env, tmp_path):
    folder = _folder(tmp_path)
    env = {**os.environ, **hub_env["env"], "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cli", "-v", "push", str(folder), "alice/cli-leak",
                           "--token", META_TOKEN], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("weightsmith: error:")]
    assert len(errors) == 1 and errors[0].startswith("weightsmith: error: the Hub rejected the token (401)")
    _assert_nowhere(META_TOKEN, [proc.stdout, proc.stderr])
    # Non-vacuous: -v really printed the HTTP client's DEBUG lines with the echoed response headers.
    assert "receive_response_headers" in proc.stderr and "X-Echo-Authorization" in proc.stderr
    assert any(tok == META_TOKEN for _, _, tok in hub_env["hub"].requests)


_HOOKS = r'''
import sys, threading, warnings
from checkpoints.secrets import install_redaction, register_secret
if sys.argv[1] == "on":
    install_redaction()
token = "zzTopSecretValue123"
register_secret(token)
warnings.warn(f"careful {token}")
t = threading.Thread(target=lambda: (_ for _ in ()).throw(RuntimeError(f"thread {token}")))
t.start()
t.join()
raise RuntimeError(f"main {token}")
'''


def test_warnings_and_uncaught_tracebacks_are_scrubbed():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = {flag: subprocess.run([sys.executable, "-c", _HOOKS, flag], capture_output=True, text=True, env=env,
                                 timeout=120, cwd=ROOT) for flag in ("on", "off")}
    on = runs["on"].stderr
    assert "careful ***" in on and "RuntimeError: thread ***" in on and "RuntimeError: main ***" in on, on
    assert "zzTopSecretValue123" not in on
    # Non-vacuity: without install_redaction the same three lines show the token.
    assert runs["off"].stderr.count("zzTopSecretValue123") == 3, runs["off"].stderr
