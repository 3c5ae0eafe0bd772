"""``hrnetdet push RUN_DIR --repo org/name``: publish a fine-tune on the Hugging Face Hub with a
generated model card, so that ``create_model("hf-hub:org/name", pretrained=True)`` rebuilds it."""
import argparse
import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional

from ..names import HF_HUB_PREFIX
from ..version import __version__
from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_config
from .convert import CheckpointError
from .config import read_saved_config
from .registry import get_family

PICTURES = ("loss.png", "lr.png", "ap.png", "predictions.png")  # a run's curves and a predictions picture
EVAL_METRICS = "metrics.json"  # `hrnetdet eval --out RUN_DIR` writes per-class AP here


def upload_folder(folder: str, repo_id: str, message: str, *, private: bool = False,
                  token: Optional[str] = None) -> str:
    """Create the model repository if needed and commit every file of ``folder``; returns the commit."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import HfHubHTTPError
    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token, library_name="hrnetdet", library_version=__version__)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
                  for name in sorted(os.listdir(folder))]
    # What a Hub call raises when the Hub cannot be reached or refuses: OSError (requests' errors,
    # HfHubHTTPError, offline mode) or, where huggingface_hub uses httpx, the HTTP client's base error.
    hub_errors = (OSError, HfHubHTTPError.__bases__[0])
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=message, repo_type="model").oid
    except hub_errors as e:
        reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ConnectionError(f"could not push to {repo_id} on the Hub ({endpoint or 'huggingface.co'}): "
                              f"{reason}") from e


def weights_dir(run_dir: str) -> str:
    """The run's ``best/`` (chosen by validation AP) when it has one, else ``last/``."""
    for sub in ("best", "last"):
        d = os.path.join(run_dir, sub)
        if os.path.isfile(os.path.join(d, WEIGHTS_FILE)) and os.path.isfile(os.path.join(d, CONFIG_FILE)):
            return d
    raise FileNotFoundError(f"{run_dir} has no best/ or last/ with {WEIGHTS_FILE} and {CONFIG_FILE}: "
                            f"not a training run folder (hrnetdet train --out RUN_DIR writes one)")


def run_card(config: Dict[str, Any], repo_id: str, pictures: List[str],
             per_class: Optional[Dict[str, Dict[str, float]]] = None) -> str:
    """The model card of a fine-tune: what it is, its validation AP (per class when measured), its
    training curves and predictions, its categories, and how to load it."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    family, width = get_family(config["architecture"])
    val = config.get("val_metrics") or {}
    evals = [EvalResult(task_type="object-detection", dataset_type=config.get("trained_on", "custom"),
                        dataset_name=f"validation set of {config.get('trained_on', 'the run')}",
                        metric_type="mAP", metric_name=f"{kind} AP", metric_value=val[f"{kind}_AP"])
             for kind in ("bbox", "segm") if f"{kind}_AP" in val]
    data = ModelCardData(library_name="hrnetdet", pipeline_tag="object-detection",
                         tags=["object-detection", "hrnet", family.name], model_name=repo_id.split("/")[-1],
                         eval_results=evals or None)
    categories = config["categories"][1:]
    ids = (config.get("category_ids") or [None] * len(config["categories"]))[1:]
    kinds = [k for k in ("bbox", "segm") if k in (per_class or {})]
    rows = [f"| {i} | {name} | " + " | ".join(f"{per_class[k]['per_class'].get(name, float('nan')):.3f}" for k in kinds)
            + (" |" if kinds else "|") for i, name in zip(ids, categories)]
    head = "| dataset id | category | " + " | ".join(f"{k} AP" for k in kinds) + (" |" if kinds else "|")
    summary = ", ".join(f"{k} AP {val[f'{k}_AP']:.3f}" for k in ("bbox", "segm") if f"{k}_AP" in val)
    settings = "\n".join(f"- `{k}={v!r}`" for k, v in sorted(config.get("build_args", {}).items())) or "- the defaults"
    figures = "\n".join(f"![{p[:-4]}]({p})" for p in pictures) or "No training curves were found in the run folder."
    body = f"""
# {repo_id.split("/")[-1]}

{family.title} on HRNetV2p-W{width} (`{config["architecture"]}`), fine-tuned with
[hrnetdet](https://pypi.org/project/hrnetdet/) on `{config.get("trained_on", "a custom dataset")}`
({config.get("iteration", "?")} iterations). Validation: {summary or "not measured"}.

## How to load

```python
import hrnetdet
model = hrnetdet.create_model("{HF_HUB_PREFIX}{repo_id}", pretrained=True).eval()
detections = model([image])  # image: CHW float RGB tensor in [0, 1]
names = [model.categories[i] for i in detections[0]["labels"]]
```

The model rebuilds with the settings it was trained with:

{settings}

## Training

{figures}

## Categories

{len(categories)} categories; labels 1..{len(categories)} in this order (`model.categories`, the
background is label 0), with their dataset ids (`model.category_ids`).

{head}
|---|---|{"---|" * len(kinds)}
{chr(10).join(rows)}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def push_run(run_dir: str, repo_id: str, *, private: bool = False, token: Optional[str] = None) -> str:
    """Upload a training run's weights, config, curves and predictions picture with a generated
    model card; returns the commit."""
    source = weights_dir(run_dir)
    config_path = os.path.join(source, CONFIG_FILE)
    config = read_saved_config(config_path)[0]
    if "categories" not in config:
        raise CheckpointError(f"{config_path}: no 'categories' (the model card lists them)")
    pictures = [p for p in PICTURES if os.path.isfile(os.path.join(run_dir, p))]
    per_class = None
    if os.path.isfile(os.path.join(run_dir, EVAL_METRICS)):
        per_class = read_config(os.path.join(run_dir, EVAL_METRICS))
    with tempfile.TemporaryDirectory() as folder:
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
        for name in pictures:
            shutil.copyfile(os.path.join(run_dir, name), os.path.join(folder, name))
        with open(os.path.join(folder, "README.md"), "w") as f:
            f.write(run_card(config, repo_id, pictures, per_class))
        return upload_folder(folder, repo_id, f"hrnetdet {__version__}: {config['architecture']} from "
                             f"{os.path.basename(os.path.abspath(run_dir))}/{os.path.basename(source)}",
                             private=private, token=token)


def run_push(args: argparse.Namespace) -> int:
    """``hrnetdet push`` (its arguments are in ``hrnetdet/cli.py``)."""
    commit = push_run(args.run_dir, args.repo, private=args.private, token=args.token)
    print(f"pushed {args.run_dir} to {args.repo}@{commit}; load it with "
          f"hrnetdet.create_model({json.dumps(HF_HUB_PREFIX + args.repo)}, pretrained=True)")
    return 0

