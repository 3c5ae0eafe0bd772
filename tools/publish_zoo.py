"""Maintainer tool: publish every weight set of the zoo on the Hugging Face Hub and pin it in the registry.

    python tools/publish_zoo.py --org ORG [--only PATTERN] [--dry-run] [--github OWNER/REPO:REF]

For each weight record (``hrnetdet models --pretrained``, filtered by the wildcard PATTERN):

1. the reference's checkpoint is downloaded, checked against the sha256 prefix in its file name and
   converted with a strict load (the path ``pretrained=True`` takes for an unpublished record);
2. the conversion is checked: its architecture's stored parity figures (``hrnetdet/zoo/parity.json``:
   every reference detection matched; the reference itself cannot run here) and training-parity
   figures must be there, and a forward pass must give finite detections;
3. ``model.safetensors``, ``config.json`` and a model card (tools/model_zoo.py's) are committed to
   ``ORG/ARCH.TAG``;
4. the repository, the commit and the file's sha256 are written into ``hrnetdet/zoo/published.json``
   (atomically, after each record), so that ``pretrained=True`` downloads that commit and checks that
   hash, with the reference's checkpoint as the fallback.

One repository per weight set, as timm does (``timm/hrnet_w18.ms_in1k``), rather than one per
architecture with a branch per tag: each repository's ``main`` is one weight set, so
``hf-hub:ORG/ARCH.TAG`` needs no revision, the model card and its model-index describe exactly
those weights, and the Hub's page and download counts are per weight set.

Resumable and idempotent: a record whose entry in the data file names ``ORG/ARCH.TAG`` and whose
pinned file is on the Hub with that sha256 is skipped without a download; one uploaded by a run that
stopped before writing the data file is adopted (its ``main`` already holds the same file).
"""
import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from hrnetdet.io import atomic_write_text
from hrnetdet.version import __version__
from hrnetdet.zoo.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from hrnetdet.zoo.convert import CheckpointError
from hrnetdet.zoo.factory import create_model
from hrnetdet.zoo.hub import fetch_pretrained, sha256_file
from hrnetdet.zoo.models import HUB_FILE, hub_fields
from hrnetdet.zoo.parity import PARITY, TRAIN_PARITY
from hrnetdet.zoo.push import upload_folder
from hrnetdet.zoo.records import PretrainedCfg
from hrnetdet.zoo.registry import get_family, get_pretrained_cfg, list_models
from model_zoo import model_card

CHECK_SIZE = 320  # the forward check's test scale: small enough for a CPU


class PublishError(RuntimeError):
    """A record that must not be published (its conversion or its parity is not established)."""


def repo_for(org: str, cfg: PretrainedCfg) -> str:
    return f"{org}/{cfg.name}"


def hub_file_sha256(repo_id: str, revision: str, token: Optional[str] = None) -> Optional[str]:
    """The sha256 of ``repo_id``'s model.safetensors at ``revision`` as the Hub reports it (the ETag
    of an LFS file), without downloading it; None when the repository or the file is not there."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    url = hf_hub_url(repo_id, WEIGHTS_FILE, revision=revision, endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        return get_hf_file_metadata(url, token=token).etag
    except HfHubHTTPError:
        return None


def published_here(entry: Optional[Dict[str, str]], repo_id: str, token: Optional[str]) -> bool:
    """Whether the data file's entry points at ``repo_id`` and the Hub holds its file unchanged."""
    return (entry is not None and entry.get("hf_hub_id") == repo_id
            and hub_file_sha256(repo_id, entry["hf_revision"], token) == entry["sha256"])


def check_parity(cfg: PretrainedCfg) -> None:
    """The stored figures that carry the reference's accuracy over to the converted weights."""
    parity = PARITY.get(cfg.arch)
    if parity is None or parity["matched"] < 100.0:
        raise PublishError(f"{cfg.name}: hrnetdet/zoo/parity.json has no full match for {cfg.arch} "
                           f"({parity and parity['matched']}% matched): run tools/parity/ first")
    w18 = cfg.arch.rsplit("_w", 1)[0] + "_w18"
    if not TRAIN_PARITY.get(w18, {}).get("passed"):
        raise PublishError(f"{cfg.name}: hrnetdet/zoo/train_parity.json has no passing step for {w18}")


def check_forward(cfg: PretrainedCfg, weights: str) -> None:
    """The converted file loads strictly into its architecture and detects something finite."""
    model = create_model(cfg.arch, checkpoint_path=weights, min_size=CHECK_SIZE, max_size=CHECK_SIZE).eval()
    image = torch.rand(3, CHECK_SIZE, CHECK_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model([image])[0]
    if not all(torch.isfinite(v.float()).all() for v in out.values()):
        raise PublishError(f"{cfg.name}: the converted weights give non-finite detections")


def convert(cfg: PretrainedCfg) -> str:
    """The reference's checkpoint downloaded, checked and converted (cached in $HRNETDET_HOME)."""
    return fetch_pretrained(dataclasses.replace(cfg, hf_hub_id=None, hf_revision=None, sha256=None))


def upload(cfg: PretrainedCfg, weights: str, repo_id: str, github: Optional[str], token: Optional[str]) -> str:
    """Commit the weights, their config.json and the model card to ``repo_id``; returns the commit."""
    with tempfile.TemporaryDirectory() as folder:
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.symlink(os.path.join(os.path.dirname(weights), name), os.path.join(folder, name))
        Path(folder, "README.md").write_text(model_card(cfg, repo_id, github))
        return upload_folder(folder, repo_id, f"hrnetdet {__version__}: {cfg.name} converted from "
                             f"{cfg.reference_file}", token=token)


def publish_one(cfg: PretrainedCfg, repo_id: str, github: Optional[str], token: Optional[str]) -> Dict[str, str]:
    """Convert, check and upload one record (or adopt what an interrupted run uploaded); its entry."""
    check_parity(cfg)
    weights = convert(cfg)
    check_forward(cfg, weights)
    digest = sha256_file(weights)
    if hub_file_sha256(repo_id, "main", token) == digest:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        url = hf_hub_url(repo_id, WEIGHTS_FILE, endpoint=os.environ.get("HF_ENDPOINT") or None)
        commit = get_hf_file_metadata(url, token=token).commit_hash
        print(f"{cfg.name}: already on {repo_id}@{commit} (adopted)")
    else:
        commit = upload(cfg, weights, repo_id, github, token)
        print(f"{cfg.name}: uploaded to {repo_id}@{commit} ({os.path.getsize(weights) / 2**20:.0f} MiB)")
    if hub_file_sha256(repo_id, commit, token) != digest:
        raise PublishError(f"{cfg.name}: {repo_id}@{commit} does not hold the uploaded file (sha256 {digest})")
    return {"hf_hub_id": repo_id, "hf_revision": commit, "sha256": digest}


def record(data_file: Path, name: str, entry: Dict[str, str]) -> None:
    """Write ``name``'s entry into the data file, re-read first (atomic: a stop loses nothing)."""
    table = hub_fields(data_file)
    table[name] = entry
    atomic_write_text(str(data_file), json.dumps(dict(sorted(table.items())), indent=1) + "\n")


def estimated_size(cfg: PretrainedCfg) -> int:
    """The float32 weights' bytes (the safetensors file's size, less its header)."""
    family, width = get_family(cfg.arch)
    with torch.device("meta"):
        model = family.build(width, num_classes=len(cfg.categories))
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def dry_run(names: List[str], org: str, data_file: Path) -> int:
    """What a run would upload, from the data file alone (nothing is downloaded or asked of the Hub)."""
    table, total = hub_fields(data_file), 0
    for name in names:
        cfg = get_pretrained_cfg(name)
        repo_id, size = repo_for(org, cfg), estimated_size(cfg)
        pinned = (table.get(name) or {}).get("hf_hub_id") == repo_id
        total += 0 if pinned else size
        print(f"{name}: {'pinned, checked on the Hub' if pinned else 'to upload'} -> {repo_id}: "
              f"{WEIGHTS_FILE} (~{size / 2**20:.0f} MiB), {CONFIG_FILE}, README.md")
    print(f"{len(names)} weight sets, ~{total / 2**30:.2f} GiB to upload")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--org", required=True, help="the Hub user or organisation that owns the repositories")
    parser.add_argument("--only", default="", help="a wildcard over arch.tag, e.g. 'faster_rcnn_*' (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; download nothing")
    parser.add_argument("--github", help="the GitHub OWNER/REPO[:REF] of hrnetdet, for the cards' torch.hub line")
    parser.add_argument("--data-file", default=str(HUB_FILE), help=f"default: {HUB_FILE}")
    parser.add_argument("--token", help="a Hub token with write access (default: the logged-in one)")
    args = parser.parse_args(argv)
    names = list_models(args.only, pretrained=True)
    if not names:
        parser.error(f"--only {args.only!r} matches no weight set (`hrnetdet models --pretrained` lists them)")
    data_file = Path(args.data_file)
    if args.dry_run:
        return dry_run(names, args.org, data_file)
    started, done, failed = time.perf_counter(), 0, []
    for name in names:
        cfg = get_pretrained_cfg(name)
        repo_id = repo_for(args.org, cfg)
        entry = hub_fields(data_file).get(name)
        if published_here(entry, repo_id, args.token):
            print(f"{name}: published at {repo_id}@{entry['hf_revision']}, skipped")
            continue
        try:
            record(data_file, name, publish_one(cfg, repo_id, args.github, args.token))
            done += 1
        except (PublishError, CheckpointError, ConnectionError) as e:
            print(f"publish_zoo: error: {e}", file=sys.stderr)
            failed.append(name)
    print(f"{done} published, {len(names) - done - len(failed)} unchanged, {len(failed)} failed "
          f"in {time.perf_counter() - started:.1f} s; {data_file} holds the pins")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
