"""Downloading a checkpoint from the Hugging Face Hub: the files a checkpoint needs, in one call.

Its own module so that :mod:`checkpoints.demo` (whose model comes from the Hub on a
Space) and :mod:`checkpoints.sources` (which resolves ``demo`` and Hub ids) both
stand on it without importing each other.
"""

from __future__ import annotations

from pathlib import Path

from .errors import WeightsmithError

# What we fetch from the Hub: weights as safetensors, plus what loads them. No pickles, no code.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def download_from_hub(repo_id: str, *, revision: str | None = None, token: str | None = None,
                      allow_patterns: list[str] | None = None) -> Path:
    """``snapshot_download`` of the files a checkpoint needs; offline, the local cache only.

    Raises one clear line when the repo is neither cached nor reachable.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .hub_client import configure_hub_client

    configure_hub_client()  # a hung Hub ends in one line within WEIGHTSMITH_HUB_TIMEOUT, not never
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, token=token, allow_patterns=allow_patterns or HUB_PATTERNS)
        )
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        why = ("HF_HUB_OFFLINE=1 is set (unset it to download)" if constants.HF_HUB_OFFLINE
               else "the Hub cannot be reached (check the network or HF_ENDPOINT)")
        raise WeightsmithError(
            f"{repo_id}: not in the local Hugging Face cache and {why}: download it on a connected machine with "
            f"`hf download {repo_id}`, copy the cache (HF_HOME), or name a local folder"
        ) from None
    except GatedRepoError:
        raise WeightsmithError(f"{repo_id}: gated repo: accept its terms on the Hub and pass a token") from None
    except RepositoryNotFoundError:
        raise WeightsmithError(f"{repo_id}: no such repo on the Hub (or it is private: pass a token)") from None
    except RevisionNotFoundError:
        raise WeightsmithError(f"{repo_id}: no revision {revision!r}") from None
    except OSError as e:
        if getattr(getattr(e, "response", None), "status_code", None) == 401:
            raise WeightsmithError(f"{repo_id}: the Hub rejected the token (401): pass a valid token, "
                                   "or none for a public repo") from None
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if token:  # never echo a token the server may have repeated
            first = first.replace(token, "***")
        raise WeightsmithError(f"{repo_id}: download failed: {first}") from None
