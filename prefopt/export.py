"""What a saved model carries beside its weights, so that a copied ``model/`` keeps its provenance, and the upload.

Every ``model/`` and ``checkpoints/step-N/model/`` gets (``write_provenance``):

* ``README.md``, a Hugging Face model card (``huggingface_hub.ModelCard``): the base model (a hub id, or the absolute
  path of a local folder), the data (each source's path or hub name and sha256, the rows, a fingerprint of the
  pinned split), the algorithm and the settings that differ from its defaults, the step, the metrics at that step,
  the prefopt version, and how to load it with plain transformers (or peft for an adapter), with the auto class
  of its head (a reward model: ``AutoModelForSequenceClassification``);
* ``prefopt_recipe.yaml``: the run's recipe as prefopt read it, every default filled in (``prefopt train`` takes it).

``merge_adapter`` folds a saved LoRA adapter into its base and carries the card and recipe over (``prefopt
merge-adapter``); ``push_to_hub`` uploads a ``model/`` folder through ``huggingface_hub`` when ``train.push_to_hub``
names a repo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import peft
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import prefopt
from prefopt.config import ModelConfig
from prefopt.errors import PrefoptError
from prefopt.models import from_pretrained, is_hub_id, load_tokenizer, model_source

CARD_FILE = "README.md"
RECIPE_FILE = "prefopt_recipe.yaml"
HEADS = ("CausalLM", "SequenceClassification")  # a policy, a reward model


def loader(adapter: bool, head: str) -> str:
    """The card's two lines that load the model: transformers' or peft's auto class for its head."""
    package, cls = ("peft", f"AutoPeftModelFor{head}") if adapter else ("transformers", f"AutoModelFor{head}")
    labels = ", num_labels=1" if head == "SequenceClassification" else ""  # a LoRA RM's base config says 2
    return f"from {package} import {cls}\nmodel = {cls}.from_pretrained(path{labels})"


def saved_head(model_dir: Path) -> str:
    """``SequenceClassification`` for a saved reward model (its config's architectures, or a SEQ_CLS adapter),
    else ``CausalLM``."""
    for name, key in (("config.json", "architectures"), ("adapter_config.json", "task_type")):
        try:
            value = json.loads((model_dir / name).read_text()).get(key) or []
        except (OSError, ValueError, AttributeError):
            continue
        if value == "SEQ_CLS" or (isinstance(value, list) and any("ForSequenceClassification" in v for v in value)):
            return "SequenceClassification"
    return "CausalLM"


def data_fingerprint(manifests: dict[str, Any]) -> str:
    """16 hex digits of sha256 over the sources and pinned parts of every manifest (same data, same split: same)."""
    pinned = {name: {"sources": m.get("sources"), "parts": m.get("parts")} for name, m in sorted(manifests.items())}
    return hashlib.sha256(json.dumps(pinned, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_settings(config: Any) -> dict[str, Any]:
    """The fields of a config dataclass that differ from their defaults, nested dataclasses flattened with dots."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in changed_settings(value).items()})
            continue
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if value != default:
            out[f.name] = ([dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
                           if isinstance(value, list) else value)
    return out


def recipe_text(run: Any) -> str:
    """The run config as a YAML recipe (function objects that have no import path appear as their repr)."""
    plain = json.loads(json.dumps(run.to_dict(), default=str))
    return yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)


def model_card(run: Any, step: int, metrics: dict[str, float], manifests: dict[str, Any], adapter: bool,
               head: str = "CausalLM") -> str:
    """The text of ``README.md`` (module docstring)."""
    from huggingface_hub import ModelCardData

    base = model_source(run.model.name_or_path)
    sources = [s for m in manifests.values() for s in m.get("sources", [])]
    hub_data = sorted({s["hub"] for s in sources if s.get("hub")})
    data = ModelCardData(library_name="peft" if adapter else "transformers",
                         base_model=base if is_hub_id(base) else None, datasets=hub_data or None,
                         tags=["prefopt", run.algorithm_name])
    settings = {**changed_settings(run.algorithm),
                **{f"model.{k}": v for k, v in changed_settings(run.model).items() if k != "name_or_path"},
                **{f"data.{k}": v for k, v in changed_settings(run.data).items() if k not in ("path", "sources")},
                **{f"train.{k}": v for k, v in changed_settings(run.train).items()
                   if k not in ("output_dir", "resume", "overwrite", "progress")}}
    rows = manifests.get("train", {}).get("parts", {})
    lines = [f"# {Path(run.train.output_dir).name or 'model'}", "",
             f"A `{run.algorithm_name}` model trained with prefopt {prefopt.__version__} for {step} steps from "
             f"`{base}`.", "",
             "| | |", "|---|---|",
             f"| base model | `{base}` |",
             f"| algorithm | `{run.algorithm_name}` |",
             f"| data | {', '.join(_source(s) for s in sources) or '(none)'} |",
             f"| rows | {', '.join(name + ' ' + str(part['count']) for name, part in rows.items()) or '?'} |",
             f"| data fingerprint | `{data_fingerprint(manifests)}` (sources and pinned split) |",
             f"| prefopt | {prefopt.__version__} |", "",
             "## Settings (those that differ from the defaults)", ""]
    lines += [f"- `{key}`: `{value}`" for key, value in settings.items()] or ["- (all defaults)"]
    lines += ["", f"## Metrics at step {step}", ""]
    shown = {k: v for k, v in sorted(metrics.items()) if isinstance(v, (int, float)) and not k.startswith("perf/")}
    lines += (["| metric | value |", "|---|---|"] + [f"| {k} | {v:.6g} |" for k, v in shown.items()] if shown
              else ["(none logged)"])
    lines += ["", "## Use", "", "```python", loader(adapter, head), "from transformers import AutoTokenizer",
              "tokenizer = AutoTokenizer.from_pretrained(path)", "```", "",
              f"`{RECIPE_FILE}` is the recipe that made it: `prefopt train {RECIPE_FILE}`, run in `{Path.cwd()}` "
              "(its relative paths start there)."]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def _source(info: dict[str, Any]) -> str:
    if info.get("hub"):
        return f"`{info['hub']}`" + (f" ({info['subset']})" if info.get("subset") else "")
    digest = f" sha256 `{info['sha256'][:12]}`" if info.get("sha256") else ""
    return f"`{info.get('path', '?')}`{digest}"


def write_provenance(model_dir: str | Path, run: Any, step: int, metrics: dict[str, float],
                     manifests: dict[str, Any]) -> None:
    """Write the model card and the recipe into ``model_dir`` (module docstring)."""
    model_dir = Path(model_dir)
    adapter = (model_dir / "adapter_config.json").is_file()
    (model_dir / CARD_FILE).write_text(model_card(run, step, metrics, manifests, adapter, saved_head(model_dir)),
                                       encoding="utf-8")
    (model_dir / RECIPE_FILE).write_text(recipe_text(run), encoding="utf-8")


def copy_provenance(adapter_dir: Path, merged_dir: Path, base: str) -> None:
    """The card and recipe of an adapter folder, beside the weights ``prefopt merge-adapter`` merged into ``base``."""
    if (adapter_dir / RECIPE_FILE).is_file():
        (merged_dir / RECIPE_FILE).write_text((adapter_dir / RECIPE_FILE).read_text(encoding="utf-8"), encoding="utf-8")
    if (adapter_dir / CARD_FILE).is_file():
        card = (adapter_dir / CARD_FILE).read_text(encoding="utf-8")
        card = card.replace("library_name: peft", "library_name: transformers", 1)
        for head in HEADS:
            card = card.replace(loader(True, head), loader(False, head))
        (merged_dir / CARD_FILE).write_text(card + f"\nThe LoRA adapter merged into `{base}` by `prefopt merge-adapter`.\n",
                                            encoding="utf-8")


def new_model_folder(out_dir: Path, overwrite: bool, what: str) -> None:
    """PrefoptError when ``out_dir`` already holds files and ``overwrite`` is not given (``init-model``,
    ``merge-adapter``: a model is never written over another one by mistake)."""
    held = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if held and not overwrite:
        raise PrefoptError(f"{str(out_dir)!r} already holds files ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}"
                           f"); give a new folder for {what}, or --overwrite to replace them (nothing was written)")


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None,
                  overwrite: bool = False) -> Path:
    """Fold a saved LoRA adapter into its (full-precision) base and save the result with its tokenizer.

    The base is ``base`` when given, else the one the adapter names (prefopt records it as an absolute path or a hub
    id; an adapter saved elsewhere with a relative path gets an error asking for ``--base``). An adapter trained on a
    4-bit base is merged into the unquantized base it was loaded from; a reward-model adapter (peft task type SEQ_CLS)
    is merged into a sequence-classification base with its score head. The adapter folder's model card and recipe
    are copied beside the merged weights. A folder that already holds files (another model, the adapter, its base)
    is refused before anything is loaded, unless ``overwrite`` (never the adapter's or base's own folder).
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise PrefoptError(f"no LoRA adapter in {str(adapter_dir)!r}: adapter_config.json is missing")
    new_model_folder(out_dir, overwrite, "the merged model")
    adapter_config = peft.PeftConfig.from_pretrained(str(adapter_dir))
    named = adapter_config.base_model_name_or_path
    if base is None and named and not Path(named).is_absolute() and not is_hub_id(named):
        raise PrefoptError(f"the adapter in {str(adapter_dir)!r} names its base by the relative path {named!r} (relative "
                           "to where it was trained); give the base model with --base")
    base_path = model_source(base or named, "--base" if base else "the base model the adapter names")
    for what, folder in (("the adapter", adapter_dir), ("its base model", Path(base_path))):
        if folder.is_dir() and out_dir.resolve() == folder.resolve():
            raise PrefoptError(f"{str(out_dir)!r} is {what}'s own folder: the merged model goes to a new folder")
    is_reward = str(adapter_config.task_type) in ("SEQ_CLS", "TaskType.SEQ_CLS")
    auto_class = AutoModelForSequenceClassification if is_reward else AutoModelForCausalLM
    extra = {"num_labels": 1} if is_reward else {}
    base_model = from_pretrained(auto_class, base_path, "adapter base model", dtype=torch.float32,
                                  use_safetensors=True, **extra)
    merged = peft.PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_path
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tokenizer_source)))
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    copy_provenance(adapter_dir, out_dir, base_path)  # the model card and recipe go with the weights
    return out_dir


def push_to_hub(model_dir: str | Path, repo_id: str, private: bool, message: str) -> str:
    """Upload ``model_dir`` to the hub repo ``repo_id`` (created when missing); the URL of the commit."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(model_dir), commit_message=message)
    return str(getattr(commit, "commit_url", commit))


class ExportedWeights:
    """A checkpoint's weights stored ONCE: the trainable parameters its ``model/`` export holds (the model's weights,
    or a LoRA adapter with its saved modules) are read back from there at resume; the trainable parameters the export
    does not hold (a critic, value or reward heads) go to ``REST_FILE``. Frozen weights are not stored: the run loads
    them again from its base. What the export holds is read from its safetensors files, so a parameter that is not
    provably there is saved in ``REST_FILE``, never lost.

    ``trained`` is the module the optimizer trains (unwrapped), ``exported`` the model ``Algorithm.save`` writes.
    """

    REST_FILE = "trainable_rest.safetensors"

    def __init__(self, trained: Any, exported: Any):
        self.trained, self.exported = trained, exported

    def _export_state(self) -> dict[str, Any]:
        """The exported model's tensors under the names its saved files use."""
        import peft

        if isinstance(self.exported, peft.PeftModel):
            return peft.get_peft_model_state_dict(self.exported)
        return self.exported.state_dict()

    @staticmethod
    def _files(model_dir: Path) -> list[Path]:
        adapter = model_dir / "adapter_model.safetensors"
        return [adapter] if adapter.is_file() else sorted(model_dir.glob("model*.safetensors"))

    def _held(self, model_dir: Path) -> set[int]:
        """Storage pointers of the exported tensors that the files in ``model_dir`` hold."""
        from safetensors import safe_open

        keys: set[str] = set()
        for file in self._files(model_dir):
            with safe_open(str(file), "pt") as handle:
                keys.update(handle.keys())
        return {tensor.data_ptr() for key, tensor in self._export_state().items() if key in keys}

    def _rest(self, model_dir: Path) -> dict[str, Any]:
        held = self._held(model_dir)
        return {name: p for name, p in self.trained.named_parameters() if p.requires_grad and p.data_ptr() not in held}

    def save_rest(self, checkpoint: Path, model_dir_name: str = "model") -> None:
        """After the export is written into ``checkpoint/model``: the trainable parameters it does not hold."""
        from safetensors.torch import save_file

        rest = self._rest(checkpoint / model_dir_name)
        if rest:
            save_file({name: p.detach().contiguous().cpu() for name, p in rest.items()}, str(checkpoint / self.REST_FILE))

    def restore(self, checkpoint: Path, model_dir_name: str = "model") -> None:
        """Load the trainable weights back: the export's into the exported model, the rest into the trained module."""
        import peft
        from safetensors.torch import load_file

        from prefopt.errors import CheckpointError

        model_dir = checkpoint / model_dir_name
        state: dict[str, Any] = {}
        for file in self._files(model_dir):
            state.update(load_file(str(file)))
        if isinstance(self.exported, peft.PeftModel):
            peft.set_peft_model_state_dict(self.exported, state)
        else:
            self.exported.load_state_dict(state, strict=False)
        rest_file = checkpoint / self.REST_FILE
        rest = load_file(str(rest_file)) if rest_file.is_file() else {}
        missing = [name for name in self._rest(model_dir) if name not in rest]
        if missing:
            raise CheckpointError(f"checkpoint {checkpoint}: trainable weights {', '.join(missing[:5])} are in neither "
                                  f"{model_dir_name}/ nor {self.REST_FILE}")
        unexpected = self.trained.load_state_dict(rest, strict=False).unexpected_keys
        if unexpected:
            raise CheckpointError(f"checkpoint {checkpoint}: {self.REST_FILE} holds weights this run does not have: "
                                  f"{', '.join(unexpected[:5])}")
