"""Maintainer tool: MODEL_ZOO.md and the Hub model cards of the zoo's records, both generated from
the registry, and publishing a record's converted weights.

    python tools/model_zoo.py [--check]                 # rewrite MODEL_ZOO.md (--check: exit 1 if stale)
    python tools/model_zoo.py push ARCH.TAG --repo-id ORG/NAME [--checkpoint FILE]
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from hrnetdet.inference.match import BOX_IOU, MASK_IOU, SCORE_TOL
from hrnetdet.zoo.parity import TRAIN_PARITY, parity_summary, train_parity_summary
from hrnetdet.zoo.records import PretrainedCfg
from hrnetdet.zoo.registry import get_arch_pretrained_cfgs, get_family, list_families, list_models

ROOT = Path(__file__).resolve().parents[1]
MODEL_ZOO = ROOT / "MODEL_ZOO.md"
BENCHMARKS = ROOT / "benchmarks" / "results.md"
COCO_EVAL = ROOT / "benchmarks" / "coco_val2017.json"  # tools/eval_zoo.py: box/mask AP x 100 per weight set
METRICS = (("box_ap", "box AP"), ("mask_ap", "mask AP"))
PAPER = "https://arxiv.org/abs/1904.04514"
REFERENCE_ZOO = "https://github.com/open-mmlab/mmdetection/tree/v3.3.0/configs/hrnet"


def _fmt(v: Optional[float]) -> str:
    return "pending" if v is None else f"{v:.1f}"


def measured(path: Path = COCO_EVAL) -> Dict[str, Dict[str, float]]:
    """Our COCO val2017 figures per weight set (tools/eval_zoo.py), or none yet."""
    return json.loads(path.read_text()) if path.exists() else {}


def _measured(cfg: PretrainedCfg, table: Dict[str, Dict[str, float]]) -> Optional[Dict[str, float]]:
    return table.get(cfg.name) or cfg.parity


def _hub_lines(cfgs: List[PretrainedCfg]) -> List[str]:
    """A hf-hub: line for the first published weight set, when there is one."""
    published = [c for c in cfgs if c.hf_hub_id]
    if not published:
        return []
    return [f"model = hrnetdet.create_model(\"hf-hub:{published[0].hf_hub_id}\", pretrained=True)  # its Hub repository"]


def _published_count(cfgs: List[PretrainedCfg]) -> str:
    published = sum(c.hf_hub_id is not None for c in cfgs)
    return (f"{published} of {len(cfgs)} weight sets are on the Hub." if published
            else "None is on the Hub yet: every weight set below comes from the reference, converted on first use.")


def _weights_source(cfg: PretrainedCfg) -> str:
    if cfg.hf_hub_id is None:
        return "reference, converted on first use"
    return f"[{cfg.hf_hub_id}@{cfg.hf_revision[:8]}](https://huggingface.co/{cfg.hf_hub_id}/tree/{cfg.hf_revision})"


def _reference_input_format(cfg: PretrainedCfg) -> str:
    return get_family(cfg.arch)[0].reference.input_format


def _input(cfg: PretrainedCfg) -> str:
    ref = _reference_input_format(cfg)
    return cfg.input_format if ref == cfg.input_format else f"{cfg.input_format} (reference: {ref})"


def _reference_normalisation(cfg: PretrainedCfg) -> str:
    """The reference's mean/std on 0-255 input in its own channel order."""
    order = slice(None, None, -1) if _reference_input_format(cfg) != cfg.input_format else slice(None)
    mean = tuple(round(m * 255, 3) for m in cfg.mean)[order]
    std = tuple(round(s * 255, 3) for s in cfg.std)[order]
    return f"{_reference_input_format(cfg)} 0-255, mean {mean}, std {std}"


def _family_table(cfgs: List[PretrainedCfg], table: Dict[str, Dict[str, float]]) -> List[str]:
    keys = [(k, label) for k, label in METRICS if any(k in c.metrics for c in cfgs)]
    head = (["weights", "schedule"] + [f"{label} (reference)" for _, label in keys]
            + [f"{label} (hrnetdet)" for _, label in keys]
            + ["parity vs reference", "training parity", "train mem GB (ref.)", "fps V100 (ref.)", "input", "weights from",
               "reference checkpoint"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cfgs:
        sched = c.schedule + (", multi-scale" if c.multiscale_train else "")
        row = ([f"`{c.name}`", sched] + [_fmt(c.metrics.get(k)) for k, _ in keys]
               + [_fmt((_measured(c, table) or {}).get(k)) for k, _ in keys]
               + [parity_summary(c.arch), train_parity_summary(c.arch), _fmt(c.metrics.get("train_mem_gb")).replace("pending", "–"),
                  _fmt(c.metrics.get("fps")).replace("pending", "–"), _input(c), _weights_source(c),
                  f"[{c.reference_sha256_prefix}]({c.reference_url})"])
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _normalisation_lines(cfgs: Sequence[PretrainedCfg]) -> List[str]:
    groups: Dict[Tuple, List[str]] = {}
    for c in cfgs:
        key = (c.input_format, c.mean, c.std, _reference_normalisation(c))
        fam = get_family(c.arch)[0].title
        if fam not in groups.setdefault(key, []):
            groups[key].append(fam)
    return [f"- {', '.join(fams)}: {fmt} in [0, 1], mean {mean}, std {std} (applied inside the model). "
            f"The reference checkpoints were trained on {ref}."
            for (fmt, mean, std, ref), fams in groups.items()]


def model_zoo_markdown(coco_eval: Path = COCO_EVAL) -> str:
    cfgs = [c for arch in list_models() for c in get_arch_pretrained_cfgs(arch)]
    table = measured(coco_eval)
    out = [
        "# hrnetdet model zoo",
        "",
        "<!-- Generated from the registry (hrnetdet/zoo/models.py) by `python tools/model_zoo.py`;"
        " do not edit by hand. -->",
        "",
        "Every weight set below is a checkpoint published by mmdetection 3.3's HRNet model zoo (the"
        " *reference*), converted to hrnetdet's layout. Figures marked *(reference)* are the reference's"
        " published COCO val2017 results; *(hrnetdet)* figures are COCO AP we measure on the converted"
        " weights with `tools/eval_zoo.py --coco DIR` (*pending* until it has run: COCO cannot be downloaded where"
        " this file is made). *Parity vs reference* is"
        " measured per architecture by the parity harness (`tools/parity/`, recorded in `hrnetdet/zoo/parity.json`):"
        " the lowest share, over its images, of the reference's top-100 detections that hrnetdet matches"
        f" (same class, box IoU >= {BOX_IOU}, score within {SCORE_TOL}, mask IoU >= {MASK_IOU}), which is what carries the"
        " reference's accuracy over. Speed and memory are the reference's (V100).",
        "",
        "## Loading",
        "",
        "```python",
        "import hrnetdet, torch",
        f"model = hrnetdet.create_model(\"{cfgs[0].name}\", pretrained=True).eval()",
        "model = hrnetdet.faster_rcnn_hrnetv2p_w32(pretrained=True)           # the default (best) weights",
        "model = hrnetdet.create_model(\"mask_rcnn_hrnetv2p_w18\", pretrained=True, num_classes=3)  # fine-tuning",
        "model = hrnetdet.create_model(\"faster_rcnn_hrnetv2p_w32\", weights_backbone=True)  # ImageNet HRNet only",
        *_hub_lines(cfgs),
        "# torch.hub, from a git checkout (hubconf.py is not in the wheel):",
        "model = torch.hub.load(\"path/to/hrnetdet\", \"faster_rcnn_hrnetv2p_w32\", source=\"local\", pretrained=True)",
        "```",
        "",
        "- torch.hub from GitHub: the same call with the repository's `owner/name:tag` in place of the path and"
        " without `source=\"local\"`; `pretrained=True` loads what that tag's `hrnetdet/zoo/published.json` pins.",
        "- Weights published on the Hugging Face Hub (`python tools/publish_zoo.py --org ORG`: one repository"
        " `ORG/ARCH.TAG` per weight set, pinned in `hrnetdet/zoo/published.json`) are downloaded at a pinned"
        " commit and checked against the sha256 in the registry, with the reference's checkpoint as the"
        f" fallback. {_published_count(cfgs)} Until a record is published (*weights from: reference*), the"
        " reference's own checkpoint is downloaded once, checked against the sha256 prefix in its file name,"
        " converted and cached as safetensors in `$HRNETDET_HOME` (default `~/.cache/hrnetdet`);"
        " `HRNETDET_REFERENCE_URL` points at a mirror of the reference's download root.",
        "- Offline: `hrnetdet download NAME... --dir DIR` on a connected machine, copy `DIR`, then set"
        " `HRNETDET_HOME=DIR HF_HOME=DIR HF_HUB_OFFLINE=1`. A local file always works:"
        " `create_model(name, checkpoint_path=\"file.pth|file.safetensors\")`.",
        "- `num_classes` counts the background (COCO: 81). With pretrained weights and another"
        " `num_classes`, everything but the class-dependent layers is loaded (they are logged).",
        "- `weights_backbone=True` (or a timm name such as `hrnet_w32.ms_in1k`) initialises the HRNet from"
        " timm's ImageNet weights; it is never fetched when detector weights are loaded.",
        "",
        "## Input",
        "",
        "Images are lists of CHW float tensors in [0, 1]; resizing and normalisation happen inside the model.",
        "",
        *_normalisation_lines(cfgs),
        "",
    ]
    for family in list_families():
        fam_cfgs = [c for c in cfgs if get_family(c.arch)[0].name == family.name]
        out += [f"## {family.title}", ""]
        out += _family_table(fam_cfgs, table) + [""]
    widths = sorted({w for f in list_families() for w in f.widths}
                    - {get_family(c.arch)[1] for c in cfgs})
    if widths:
        out += [f"Widths without published detector weights (build from scratch or with `weights_backbone`): "
                f"{', '.join(f'W{w}' for w in widths)}.", ""]
    out += _train_parity_lines()
    out += ["## Speed and memory (hrnetdet)", "", BENCHMARKS.read_text().strip(), ""]
    return "\n".join(out)


def _fig(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.2g}"


def _train_parity_lines() -> List[str]:
    """The training-parity harness's figures per family (hrnetdet/zoo/train_parity.json)."""
    out = ["## Training parity (one step, W18)", "",
           "One training forward and backward of each family at W18 against mmdetection 3.3 on the same"
           " checkpoint, images and ground truth, with the reference's random samples replayed"
           " (`tools/parity/train_reference.py`, `train_compare.py`): the relative difference of each loss"
           " term and of the worst parameter gradient (L2 norm, over every parameter), both sides in float64."
           " In float32 the worst gradients differ by about as much as 1e-7 of input noise moves hrnetdet's own"
           " float32 gradients (*float32 rounding*): random-weight HRNets amplify rounding.", "",
           "| model | passes (1e-4 / 1e-3) | loss terms (relative difference) | worst gradient | parameter |"
           " float32: loss / gradient | float32 rounding: loss / gradient |", "|---|---|---|---|---|---|---|"]
    for name, p in TRAIN_PARITY.items():
        losses = ", ".join(f"{k} {v:.1g}" for k, v in p["losses"].items())
        f32 = p["float32"]
        out.append(f"| `{name}` | {'yes' if p['passed'] else 'no'} | {losses} | {p['worst_grad_rel_diff']:.2g} |"
                   f" `{p['worst_grad_param']}` |"
                   f" {f32['max_loss_rel_diff']:.1g} / {f32['worst_grad_rel_diff']:.2g} |"
                   f" {_fig(f32['rounding_max_loss'])} / {_fig(f32['rounding_worst_grad'])} |")
    notes = [f"* `{name}`: {note}" for name, p in TRAIN_PARITY.items() for note in p.get("notes", [])]
    return out + ([""] + notes if notes else []) + [""]


CITATION = """```bibtex
@article{sun2019hrnetv2,
  title   = {High-Resolution Representations for Labeling Pixels and Regions},
  author  = {Sun, Ke and Zhao, Yang and Jiang, Borui and Cheng, Tianheng and Xiao, Bin and Liu, Dong
             and Mu, Yadong and Wang, Xinggang and Liu, Wenyu and Wang, Jingdong},
  journal = {arXiv preprint arXiv:1904.04514},
  year    = {2019}
}
@article{chen2019mmdetection,
  title   = {{MMDetection}: Open MMLab Detection Toolbox and Benchmark},
  author  = {Chen, Kai and Wang, Jiaqi and Pang, Jiangmiao and others},
  journal = {arXiv preprint arXiv:1906.07155},
  year    = {2019}
}
```"""


def torch_hub_line(arch: str, tag: str, github: Optional[str]) -> str:
    """torch.hub's call for ``arch.tag``: from GitHub when the repository's address is known, else
    from a local checkout (hubconf.py is not in the wheel)."""
    if github:
        return f'model = torch.hub.load("{github}", "{arch}", pretrained="{tag}", trust_repo=True)'
    return (f'model = torch.hub.load("path/to/hrnetdet", "{arch}", source="local", pretrained="{tag}")'
            "  # a git checkout")


def model_card(cfg: PretrainedCfg, repo_id: str, github: Optional[str] = None) -> str:
    """The Hub README of ``cfg``'s weights, with huggingface metadata (model-index from our COCO
    figures once tools/eval_zoo.py has measured them, else the reference's, labelled as such)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    family, width = get_family(cfg.arch)
    ours = _measured(cfg, measured())
    figures = ours or cfg.metrics
    evals = [EvalResult(task_type="object-detection", dataset_type="coco", dataset_name="COCO val2017",
                        metric_type="mAP", metric_name=label, metric_value=figures[k],
                        source_name=None if ours else "mmdetection HRNet model zoo (reference)",
                        source_url=None if ours else REFERENCE_ZOO)
             for k, label in METRICS if k in figures]
    data = ModelCardData(library_name="hrnetdet", pipeline_tag="object-detection", license=cfg.license.lower(),
                         datasets=["coco"], tags=["object-detection", "hrnet", family.name],
                         model_name=cfg.name, eval_results=evals or None)
    rows = "\n".join(f"| {label} | {_fmt(cfg.metrics.get(k))} | {_fmt((ours or {}).get(k))} |"
                     for k, label in METRICS if k in cfg.metrics)
    names = ", ".join(cfg.categories[1:])
    body = f"""
# {cfg.name}

{family.title} on HRNetV2p-W{width} (HRNet + HRFPN) in torchvision's detection contract, converted from
mmdetection's `{cfg.reference_file}` (schedule {cfg.schedule}{', multi-scale training' if cfg.multiscale_train else ''}).
Paper: [High-Resolution Representations for Labeling Pixels and Regions]({PAPER}).

## How to load

```python
import hrnetdet, torch
# by name: hrnetdet's registry pins this repository's commit and checks the file's sha256
model = hrnetdet.create_model("{cfg.name}", pretrained=True).eval()
# from this repository directly (its config.json and model.safetensors)
model = hrnetdet.create_model("hf-hub:{repo_id}", pretrained=True).eval()
# with torch.hub
{torch_hub_line(cfg.arch, cfg.tag, github)}
detections = model([image])  # image: CHW float RGB tensor in [0, 1]
```

`pip install hrnetdet` first. Without the Hub, `pretrained=True` falls back to the reference's own checkpoint
([{cfg.reference_sha256_prefix}]({cfg.reference_url})), checked against its sha256 prefix and converted locally.

## Results on COCO val2017

| metric | reference (mmdetection) | hrnetdet (measured) |
|---|---|---|
{rows}

## Parity with the reference

- Inference: {parity_summary(cfg.arch)}: the parity harness (`tools/parity/` in hrnetdet) runs mmdetection
  3.3.0 and hrnetdet on the same checkpoint and images, and counts the reference's top-100 detections that
  hrnetdet matches (same class, box IoU >= {BOX_IOU}, score within {SCORE_TOL}, mask IoU >= {MASK_IOU}). Measured
  per architecture on seeded weights: the reference was not run on this file when it was published; the
  conversion was checked by a strict load (every key, every shape) and a forward pass.
- Training (one step, float64): {train_parity_summary(cfg.arch)} relative difference.

## Input

{cfg.input_format} in [0, 1], mean {cfg.mean}, std {cfg.std}; resizing to the reference's test scale and
normalisation happen inside the model. The reference checkpoint was trained on {_reference_normalisation(cfg)}.

## Categories

{len(cfg.categories)} classes with the background at index 0: {names}.

## Licence

{cfg.license} (hrnetdet). The weights are mmdetection's, released under its Apache-2.0 licence
([model zoo]({REFERENCE_ZOO})), trained on {cfg.dataset} (its images are under their own terms of use).

## Citation

{CITATION}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def push(name: str, repo_id: str, checkpoint: Optional[str] = None, private: bool = False,
         token: Optional[str] = None) -> Tuple[str, str]:
    """Convert ``name``'s weights (or ``checkpoint``), upload model.safetensors, config.json and the
    model card; returns (commit, sha256) to pin in the registry."""
    from hrnetdet.zoo.checkpoint import WEIGHTS_FILE, save_pretrained
    from hrnetdet.zoo.factory import create_model
    from hrnetdet.zoo.hub import sha256_file
    from hrnetdet.zoo.push import upload_folder
    from hrnetdet.zoo.registry import get_pretrained_cfg
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f"{name} has no registry record to describe it; `hrnetdet models --pretrained` lists them")
    model = create_model(cfg.name, pretrained=checkpoint is None, checkpoint_path=checkpoint)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder, {"weights": cfg.name, "source": cfg.reference_url})
        digest = sha256_file(os.path.join(folder, WEIGHTS_FILE))
        Path(folder, "README.md").write_text(model_card(cfg, repo_id))
        commit = upload_folder(folder, repo_id, f"hrnetdet: {cfg.name} converted from {cfg.reference_file}",
                               private=private, token=token)
    return commit, digest


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(MODEL_ZOO), help=f"default: {MODEL_ZOO}")
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is out of date")
    parser.add_argument("--coco-eval", default=str(COCO_EVAL), help=f"our COCO figures (tools/eval_zoo.py; default: {COCO_EVAL})")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("push", help="convert a record's weights and upload them with its model card")
    p.add_argument("name", help="arch.tag with a registry record")
    p.add_argument("--repo-id", required=True, help="the Hub repository, e.g. org/faster_rcnn_hrnetv2p_w32.coco_2x")
    p.add_argument("--checkpoint", help="a local reference .pth or hrnetdet .safetensors (default: pretrained)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", help="a Hub token (default: the logged-in one)")
    args = parser.parse_args(argv)
    if args.command == "push":
        commit, digest = push(args.name, args.repo_id, args.checkpoint, args.private, args.token)
        print(f"pushed {args.name} to {args.repo_id}@{commit}; registry record: "
              f"hf_hub_id={args.repo_id!r}, hf_revision={commit!r}, sha256={digest!r}")
        return 0
    text = model_zoo_markdown(Path(args.coco_eval))
    current = Path(args.out).read_text() if Path(args.out).exists() else None
    if args.check:
        if current != text:
            print(f"{args.out} is out of date: run `python tools/model_zoo.py`", file=sys.stderr)
            return 1
        return 0
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
