"""Publish a finished output folder (merge, adapter, edited model) to the Hugging Face Hub.

One entry point, :func:`push_folder`, serves the CLI (``weightsmith push``) and
the app's Export tab. It uses ``HfApi``: ``create_repo(exist_ok=True)``, then a
single ``create_commit`` holding every file, so the push lands as one commit or
not at all (files are uploaded first; the commit is created only after every
upload succeeded). ``upload_folder`` is not used: with ``hf_xet`` installed it
may split a large folder into several commits. Uploads go through ``hf_xet``
when it is installed and the Hub supports it (``huggingface_hub``'s default;
nothing here disables it).

The card is part of the same commit: it must already be in the folder
(``checkpoints.cards.write_card``); its loading snippet is pointed at the repo
id and saved into the folder before the upload. ``ModelCard.push_to_hub`` is
never used (its validation call ignores ``HF_ENDPOINT``).

Tokens: explicit argument > ``HF_TOKEN`` > ``huggingface_hub``'s stored login.
A token is checked (:func:`checkpoints.secrets.check_token`: a malformed one
is refused without repeating it), registered with :mod:`checkpoints.secrets`
so that no log record or message can show it (:func:`push_folder` installs the
redaction itself, for library callers), passed to one ``HfApi`` object
for the duration of the call and dropped. A folder whose text files hold the
token is refused before anything is sent.

Every request has a bounded wait (:mod:`checkpoints.hub_client`,
``WEIGHTSMITH_HUB_TIMEOUT``): a Hub that stops answering ends the push with
one line.

Example::

    result = push_folder("out/my-merge", "alice/my-merge", private=True)
    print(result.commit_url)
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cards import CardInfo, load_card, set_card_repo, write_card
from .errors import WeightsmithError
from .hub_client import configure_hub_client, is_timeout
from .jobs import Job
from .refs import is_hub_id
from .secrets import check_token, install_redaction, redact, register_secret
from .sources import public_name

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], Any]

# What Gradio (>= 6.6) hands a function as gr.OAuthToken.token when "signing in" locally:
# gradio.oauth._get_mocked_oauth_info() sets access_token to this fixed string (scope "openid profile").
MOCK_OAUTH_TOKEN = "mock-oauth-token-for-local-dev"

TOKEN_HELP = ("create a write token at https://huggingface.co/settings/tokens and pass it with --token, "
              "set HF_TOKEN, or run `hf auth login`")

# Never uploaded: VCS/cache folders and half-written outputs of ShardedWriter.
_SKIP_DIRS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}
# JSON keys where transformers/PEFT record where a model was loaded from (a local path on this machine).
_PATH_KEYS = ("base_model_name_or_path", "_name_or_path", "name_or_path")
_TEXT_SUFFIXES = (".md", ".json", ".yaml", ".yml", ".txt", ".jinja")
_BIG_TEXT_FILES = {"tokenizer.json", "vocab.json", "merges.txt", "vocab.txt"}


@dataclass
class PushResult:
    """Where the push landed. ``pr_url`` is set with ``create_pr``."""

    repo_url: str
    commit_url: str
    commit_oid: str
    pr_url: str | None = None
    files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------------------------
def running_on_space() -> bool:
    """True inside a Hugging Face Space (where OAuth sign-in is real)."""
    return bool(os.environ.get("SPACE_ID"))


def is_mock_oauth_token(token: str | None) -> bool:
    """True for the placeholder Gradio passes as ``gr.OAuthToken`` when the app runs locally."""
    return bool(token) and token.strip().startswith("mock-oauth-token")


def token_for_push(oauth_token: Any, field_token: str | None) -> str | None:
    """The token the Export tab should push with, or None.

    ``oauth_token`` is the ``gr.OAuthToken`` (or None, or a plain string);
    ``field_token`` is what the user typed in the password field. A token typed
    by the user wins; a real OAuth token comes next; the local mock OAuth token
    (``MOCK_OAUTH_TOKEN``) is ignored, since the Hub would reject it. None means
    "no token from the page": on a Space, refuse to push then (pass
    ``allow_ambient_token=False`` to :func:`push_folder`, otherwise it would
    fall back to the Space's own ``HF_TOKEN``); locally, :func:`push_folder`
    falls back to ``HF_TOKEN`` or the stored login.
    """
    typed = (field_token or "").strip()
    if typed:
        return typed
    value = getattr(oauth_token, "token", oauth_token)
    if isinstance(value, str) and value.strip() and not is_mock_oauth_token(value):
        return value.strip()
    return None


def resolve_token(token: str | None = None, *, allow_ambient_token: bool = True) -> str:
    """Explicit ``token`` > ``HF_TOKEN`` > huggingface_hub's stored login; one-line error if none or malformed.

    Whichever token is chosen is registered as a secret (never logged or
    shown) and checked by :func:`checkpoints.secrets.check_token`.
    """
    register_secret(token)
    if token is not None and token.strip():
        if is_mock_oauth_token(token):
            raise WeightsmithError("this is Gradio's local mock sign-in token, which the Hub rejects: " + TOKEN_HELP)
        return check_token(token)
    if allow_ambient_token:
        env = os.environ.get("HF_TOKEN") or ""
        if env.strip():
            return check_token(env)
        from huggingface_hub import get_token

        stored = get_token()
        if stored:
            return check_token(stored)
    raise WeightsmithError("no Hugging Face token: " + TOKEN_HELP)


def scrub(text: str, *secrets: str | None) -> str:
    """``text`` with ``secrets`` (now registered), every registered secret and any ``hf_…`` token replaced by ``***``."""
    for secret in secrets:
        register_secret(secret)
    return redact(text)


def _refuse_secret_in_files(files: list[tuple[str, Path | bytes]]) -> None:
    """One line when a text file about to be published holds a registered token (a card, a recipe)."""
    for name, item in files:
        if not name.endswith(_TEXT_SUFFIXES):
            continue
        raw = item if isinstance(item, bytes) else item.read_bytes() if item.stat().st_size < 2**24 else b""
        text = raw.decode("utf-8", errors="replace")
        if redact(text) != text:
            raise WeightsmithError(f"{name}: holds a Hugging Face token; remove it before pushing")


# --------------------------------------------------------------------------------------------
# folder checks
# --------------------------------------------------------------------------------------------
def _local_markers(folder: Path) -> list[str]:
    """Path prefixes that would reveal this machine's layout if published."""
    marks = {str(folder.resolve()), str(folder.resolve().parent), str(Path.home()), tempfile.gettempdir(),
             str(Path.cwd())}
    return sorted((m for m in marks if m not in ("/", "") and len(m) > 3), key=len, reverse=True)


def _sanitize_json_paths(path: Path, raw: bytes) -> bytes:
    """Replace local paths recorded under known keys (PEFT's base_model_name_or_path) by public names."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw
    text = raw.decode("utf-8")
    if not isinstance(data, dict):
        return raw
    for key in _PATH_KEYS:
        value = data.get(key)
        if isinstance(value, str) and value:
            public = public_name(value)
            if public != value:
                # Edit the value in place so the rest of the file stays byte-identical.
                text = text.replace(json.dumps(value), json.dumps(public))
                text = text.replace(json.dumps(value, ensure_ascii=False), json.dumps(public, ensure_ascii=False))
    return text.encode("utf-8")


def collect_files(folder: Path) -> list[tuple[str, Path | bytes]]:
    """The files to publish, as (path in repo, local path or sanitized bytes), sorted by path.

    Raises a one-line :class:`WeightsmithError` if a text file still names a
    local path after sanitizing (README, configs, recipes).
    """
    folder = Path(folder)
    markers = _local_markers(folder)
    out: list[tuple[str, Path | bytes]] = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part in _SKIP_DIRS or ".partial-" in part for part in rel.parts) or not path.is_file():
            continue
        if path.name.startswith(".") and path.name != ".gitattributes":
            continue
        item: Path | bytes = path
        if path.suffix in _TEXT_SUFFIXES and path.name not in _BIG_TEXT_FILES and path.stat().st_size < 2**20:
            raw = path.read_bytes()
            if path.suffix == ".json":
                clean = _sanitize_json_paths(path, raw)
                if clean != raw:
                    log.info("%s: local paths replaced by model names in the published copy", rel.as_posix())
                    item = raw = clean
            text = raw.decode("utf-8", errors="replace")
            for mark in markers:
                if re.search(re.escape(mark) + r"(?=[/\\\"'\s`)]|$)", text):
                    raise WeightsmithError(
                        f"{rel.as_posix()}: names a local path on this machine; remove it before pushing "
                        "(cards built with checkpoints.cards never do)"
                    )
        out.append((rel.as_posix(), item))
    return out


# --------------------------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------------------------
def _explain(err: BaseException, repo_id: str, revision: str | None, stage: str) -> str:
    """One line for a failed push (not yet scrubbed)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # create_commit uploads everything first and commits last, in one request the Hub applies atomically.
    nothing = "nothing was committed"
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        server = (err.server_message or "").strip().splitlines()
        detail = server[0] if server else first
        if status == 401:
            return f"the Hub rejected the token (401): it is invalid or expired; {TOKEN_HELP}"
        if status == 403:
            return f"the token may not write to {repo_id} (403): it needs write access to that namespace ({detail})"
        if isinstance(err, RevisionNotFoundError):
            return f"{repo_id}: no branch {revision!r} on the Hub ({nothing})"
        if isinstance(err, RepositoryNotFoundError):
            return f"{repo_id}: repo not found, or this token cannot see it ({nothing})"
        return f"the Hub answered {status} while {stage}: {detail} ({nothing})"
    if is_timeout(err):
        from .hub_client import ENV_VAR, hub_timeout

        return (f"the Hub did not answer within {hub_timeout():g} s while {stage} ({nothing}; "
                f"try again later, or raise {ENV_VAR})")
    if isinstance(err, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE=1 is set: pushing needs the network; unset it"
    if isinstance(err, ValueError) and "Invalid metadata in README.md" in str(err):
        lines = [ln.strip("- ").strip() for ln in str(err).splitlines()[1:] if ln.strip()]
        return f"the Hub rejected the card's front matter: {'; '.join(lines) or first} ({nothing})"
    cause = err.__cause__ or err.__context__
    if isinstance(err, RuntimeError) and "while uploading" in first and cause is not None:
        cause_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0].rstrip(".")
        m = re.search(r"uploading '(.+?)'", first)
        what = m.group(1) if m else "a file"
        return f"uploading {what} to the Hub failed: {cause_line} ({nothing}; run the push again)"
    name = type(err).__name__
    if "Connect" in name or "Timeout" in name or isinstance(err, OSError):
        return f"cannot reach the Hub while {stage}: {first} ({nothing})"
    return f"push failed while {stage}: {name}: {first} ({nothing})"


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    progress: ProgressFn | None = None,
    allow_ambient_token: bool = True,
    card: CardInfo | None = None,
    job: Job | None = None,
) -> PushResult:
    """Publish ``folder`` (with its card) to ``repo_id`` on the Hub in one commit.

    ``folder``: an output folder holding ``README.md`` (see
    :func:`checkpoints.cards.write_card`). ``repo_id``: ``owner/name`` (or
    ``name`` under the token's user). ``token``: see :func:`resolve_token`;
    ``allow_ambient_token=False`` refuses ``HF_TOKEN``/stored login (the app on
    a Space). ``private`` only applies when the repo is created. ``revision``:
    a branch, created from ``main`` if missing. ``create_pr``: open a pull
    request instead of committing to the branch. ``progress(fraction, text)``
    is called at each stage (``gr.Progress`` fits); ``job`` (:class:`checkpoints.jobs.Job`)
    is told the same stages instead. ``card``: when given, this
    card is written into the folder first (for folders without one, e.g. uploads).

    Returns :class:`PushResult` with the commit URL. Raises a one-line
    :class:`WeightsmithError` (never containing the token) on failure, in which
    case no commit was made.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    folder = Path(folder)
    if job is not None and progress is not None:
        raise ValueError("pass job, or the older progress, not both")
    report = job.progress if job is not None else progress or (lambda fraction, text: None)
    if not folder.is_dir():
        raise WeightsmithError(f"{public_name(str(folder))}: no such folder to push")
    repo_id = (repo_id or "").strip()
    if not is_hub_id(repo_id, owner_optional=True):  # the one rule (checkpoints.refs), before any network
        raise WeightsmithError(f"{repo_id!r} is not a valid Hub repo id (owner/name)")
    if revision is not None and not revision.strip():
        revision = None
    if constants.HF_HUB_OFFLINE:
        raise WeightsmithError("HF_HUB_OFFLINE=1 is set: pushing needs the network; unset it")

    if card is not None:
        write_card(folder, card)
    load_card(folder)  # one clear error when the card is missing or the Hub would refuse it
    collect_files(folder)  # refuse local paths before anything reaches the network
    # The library alone must not leak either (a caller with DEBUG logging on sees the HTTP client's headers).
    install_redaction()
    secret = resolve_token(token, allow_ambient_token=allow_ambient_token)
    _refuse_secret_in_files(collect_files(folder))
    configure_hub_client()
    stage = "creating the repo"
    try:
        api = HfApi(token=secret, library_name="weightsmith")
        report(0.0, f"creating {repo_id}")
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = repo_url.repo_id or repo_id
        if set_card_repo(folder, repo_id):  # the card is saved into the folder before upload
            log.info("README.md: loading snippet now points at %s", repo_id)
        files = collect_files(folder)
        _refuse_secret_in_files(files)
        # A branch is created from main when missing; refs/pr/N (an open pull request) is committed to as is.
        if revision and not create_pr and revision != constants.DEFAULT_REVISION and not revision.startswith("refs/"):
            stage = f"creating branch {revision}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(item) if isinstance(item, Path) else item)
                      for name, item in files]
        total = sum(item.stat().st_size if isinstance(item, Path) else len(item) for _, item in files)
        stage = "uploading files"
        report(0.05, f"uploading {len(files)} files ({total / 1e6:.1f} MB)")
        log.info("pushing %d files (%.1f MB) to %s", len(files), total / 1e6, repo_id)
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {public_name(str(folder))} with Weightsmith",
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
    except WeightsmithError as e:
        raise WeightsmithError(scrub(str(e), secret)) from None
    except Exception as e:  # any client/network failure becomes one scrubbed line
        message = scrub(_explain(e, repo_id, revision, stage), secret)
        log.debug("push to %s failed at %s: %s", repo_id, stage, message)
        raise WeightsmithError(message) from None
    finally:
        api = None  # drop the client holding the token
        secret = None
    report(1.0, "pushed")
    result = PushResult(repo_url=str(repo_url), commit_url=info.commit_url, commit_oid=info.oid,
                        pr_url=info.pr_url, files=[name for name, _ in files])
    log.info("pushed %s: %s", repo_id, result.pr_url or result.commit_url)
    return result
