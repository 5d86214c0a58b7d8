"""Downloading models from the Hugging Face hub into its cache (``routerctl pull``), and
removing what was downloaded (``DELETE /models``).

Owns choosing the files of a pull with llama.cpp's rules (a tag matched as ``TAG[.-]``
case-insensitively; no tag: Q4_K_M, then Q8_0; every part of a split model; the repo's
projector if it has one) and turning hub failures into clear errors. Downloads run in the daemon,
so they survive the client going away and land in the cache the daemon serves from; huggingface_hub
honours HF_TOKEN. An interrupted transfer: huggingface_hub (2.x) retries it within the pull,
resuming from the last whole chunk it wrote; a pull that fails leaves no partial file (each
download has its own temporary file, deleted on failure), so pulling again starts the file from
its first byte (tests/test_catalog.py checks both). It must not touch the catalog; the daemon
rescans after.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Callable, Sequence

import attrs
import httpx2  # huggingface_hub 2.x talks through it; its errors are what a pull meets

from routerd.errors import BadRequest, NotFound, RouterdError, Unavailable
from routerd.models import discovery
from routerd.models.gguf_meta import split_parts

Progress = Callable[[str, int, int | None], None]  # file, bytes done, bytes total


class Forbidden(RouterdError):
    status = 403
    type = "permission_error"
    code = "hub_forbidden"
    rpc_code = -32008


@attrs.frozen
class PullPlan:
    repo_id: str
    files: tuple[str, ...]
    tag: str


def plan_pull(repo_id: str, files: Sequence[str], tag: str | None, filename: str | None) -> PullPlan:
    """The files to download for ``repo_id[:tag]`` or ``--file filename`` (pure)."""
    candidates: dict[str, tuple[str, str]] = {}  # tag -> (dir, first file)
    projectors: dict[str, str] = {}
    for directory, names in sorted(discovery.by_directory(files).items()):
        models, found_projectors = discovery.model_files(names)
        if found_projectors:
            projectors[directory] = found_projectors[0]
        for name in models:
            if filename is not None and filename not in (name, os.path.join(directory, name)):
                continue
            candidates.setdefault(discovery.tag_of(name), (directory, name))
    if filename is not None and not candidates:
        raise NotFound(f"{repo_id} has no model file {filename!r}; its GGUF files: "
                       f"{', '.join(f for f in files if f.lower().endswith('.gguf')) or 'none'}", code="file_not_found")
    chosen = discovery.choose_quant(list(candidates), tag if filename is None else None)
    if chosen is None:
        available = ", ".join(sorted(candidates)) or "none (no GGUF model files)"
        raise NotFound(f"{repo_id} has no {tag or 'GGUF'} model; available: {available}", code="quant_not_found",
                       data={"available": sorted(candidates)})
    directory, first = candidates[chosen]
    parts = [os.path.basename(p) for p in split_parts(first)]
    wanted = [os.path.join(directory, p) if directory else p for p in parts]
    if directory in projectors:
        wanted.append(os.path.join(directory, projectors[directory]) if directory else projectors[directory])
    return PullPlan(repo_id, tuple(wanted), chosen)


def pull(repo_id: str, tag: str | None, filename: str | None, *, cache_dir: str, endpoint: str | None,
         token: str | None, progress: Progress) -> PullPlan:
    """Download what ``plan_pull`` chooses into the hub cache (blocking: run it in a thread)."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    where = endpoint or "https://huggingface.co"
    try:
        files = HfApi(endpoint=endpoint, token=token).list_repo_files(repo_id)
        plan = plan_pull(repo_id, files, tag, filename)
        for name in plan.files:
            hf_hub_download(repo_id, name, cache_dir=cache_dir, endpoint=endpoint, token=token,
                            tqdm_class=_progress_bar(name, progress))
        return plan
    except GatedRepoError:
        raise Forbidden(f"{repo_id} is gated: accept its terms on the hub, then set HF_TOKEN for routerd") from None
    except RepositoryNotFoundError:
        raise NotFound(f"{repo_id} was not found on {where} (a private repo needs HF_TOKEN)",
                       code="repo_not_found") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, httpx2.ConnectError, httpx2.ConnectTimeout) as exc:
        raise Unavailable(f"cannot reach {where} to pull {repo_id} (offline?): {type(exc).__name__}: {exc}",
                          code="hub_unreachable", retry_after=30) from None
    except httpx2.TransportError as exc:
        raise Unavailable(f"the download of {repo_id} was interrupted ({type(exc).__name__}: {exc}); "
                          "the partial file is not kept: pulling again downloads that file from its start",
                          code="hub_interrupted", retry_after=5) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            raise Forbidden(f"{where} refused {repo_id} ({status}): check HF_TOKEN") from None
        raise Unavailable(f"pulling {repo_id} failed: {exc}", code="hub_error") from None


def remove_cached(model_path: str, mmproj: Sequence[str], cache_dir: str) -> list[str]:
    """Delete one cached model's files (every part of a split model; its projector unless another
    model of the snapshot still uses it) from the hub cache, blobs included, and the whole repo
    folder once no file is left in it (blocking: run it in a thread). The snapshot paths removed."""
    cache = os.path.realpath(cache_dir)
    snapshot_file = os.path.abspath(model_path)
    if os.path.commonpath([cache, os.path.realpath(os.path.dirname(snapshot_file))]) != cache:
        raise BadRequest(f"{model_path} is not in the Hugging Face cache {cache_dir}", code="model_not_removable")
    directory = os.path.dirname(snapshot_file)
    files = list(split_parts(snapshot_file))
    others = [name for name in os.listdir(directory) if name.lower().endswith(".gguf")
              and os.path.join(directory, name) not in files and os.path.join(directory, name) not in mmproj]
    if not others:
        files += [path for path in mmproj if os.path.dirname(os.path.abspath(path)) == directory]
    repo = _repo_folder(cache, snapshot_file)
    removed = []
    for path in files:
        if not os.path.lexists(path):
            continue
        blob = os.path.realpath(path)
        os.unlink(path)
        removed.append(path)
        if blob != path and os.path.exists(blob) and not _linked_from(os.path.join(repo, "snapshots"), blob):
            os.unlink(blob)
    left = [name for _, _, names in os.walk(os.path.join(repo, "snapshots")) for name in names]
    if not left:
        shutil.rmtree(repo, ignore_errors=True)
    return removed


def _repo_folder(cache: str, snapshot_file: str) -> str:
    """``models--org--repo`` of a file under ``cache/models--org--repo/snapshots/REV/...``."""
    relative = os.path.relpath(snapshot_file, cache).split(os.sep)
    return os.path.join(cache, relative[0])


def _linked_from(snapshots: str, blob: str) -> bool:
    """Whether a file under ``snapshots`` still points to ``blob``."""
    for root, _, names in os.walk(snapshots):
        for name in names:
            if os.path.realpath(os.path.join(root, name)) == blob:
                return True
    return False


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """``org/repo[:TAG]`` as (repo id, tag) (400 when malformed)."""
    repo_id, _, tag = ref.partition(":")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise BadRequest(f"{ref!r} is not org/repo[:QUANT] (e.g. ggml-org/gemma-3-270m-GGUF:Q4_K_M)",
                         code="invalid_model_ref")
    return repo_id, tag or None


def _progress_bar(name: str, report: Progress) -> type:
    """A silent tqdm that reports bytes to ``report`` at most every 0.25 s."""
    from tqdm.auto import tqdm

    class Reporter(tqdm):  # type: ignore[misc]
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs.update(file=io.StringIO(), disable=False)
            super().__init__(*args, **kwargs)
            self._last = 0.0

        def update(self, n: float | None = 1) -> bool | None:
            shown: bool | None = super().update(n)
            now = time.monotonic()
            if now - self._last >= 0.25 or (self.total and self.n >= self.total):
                self._last = now
                report(name, int(self.n), int(self.total) if self.total else None)
            return shown

    return Reporter
