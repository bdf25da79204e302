"""What a saved model carries beside its weights, so that a copied ``model/`` keeps its provenance, and the upload.

Every ``model/`` and ``checkpoints/step-N/model/`` gets (``write_provenance``):

* ``README.md``, a Hugging Face model card (``huggingface_hub.ModelCard``): the base model (a hub id, or the absolute
  path of a local folder), the data (each source's path or hub name and sha256, the rows, a fingerprint of the
  pinned split), the algorithm and the settings that differ from its defaults, the step, the metrics at that step,
  the prefopt version, and how to load it with plain transformers (or peft for an adapter);
* ``prefopt_recipe.yaml``: the run's recipe as prefopt read it, every default filled in (``prefopt train`` takes it).

``push_to_hub`` uploads a ``model/`` folder through ``huggingface_hub`` when ``train.push_to_hub`` names a repo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

import prefopt

CARD_FILE = "README.md"
RECIPE_FILE = "prefopt_recipe.yaml"
PEFT_LOADER = "from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(path)"
PLAIN_LOADER = "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(path)"


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


def model_card(run: Any, step: int, metrics: dict[str, float], manifests: dict[str, Any], adapter: bool) -> str:
    """The text of ``README.md`` (module docstring)."""
    from huggingface_hub import ModelCardData

    from prefopt.models import is_hub_id, model_source

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
    loader = PEFT_LOADER if adapter else PLAIN_LOADER
    lines += ["", "## Use", "", "```python", loader, "from transformers import AutoTokenizer",
              "tokenizer = AutoTokenizer.from_pretrained(path)", "```", "",
              f"`{RECIPE_FILE}` is the recipe that made it: `prefopt train {RECIPE_FILE}`."]
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
    (model_dir / CARD_FILE).write_text(model_card(run, step, metrics, manifests, adapter), encoding="utf-8")
    (model_dir / RECIPE_FILE).write_text(recipe_text(run), encoding="utf-8")


def copy_provenance(adapter_dir: Path, merged_dir: Path, base: str) -> None:
    """The card and recipe of an adapter folder, beside the weights ``prefopt merge-adapter`` merged into ``base``."""
    if (adapter_dir / RECIPE_FILE).is_file():
        (merged_dir / RECIPE_FILE).write_text((adapter_dir / RECIPE_FILE).read_text(encoding="utf-8"), encoding="utf-8")
    if (adapter_dir / CARD_FILE).is_file():
        card = (adapter_dir / CARD_FILE).read_text(encoding="utf-8")
        card = card.replace("library_name: peft", "library_name: transformers", 1).replace(PEFT_LOADER, PLAIN_LOADER)
        (merged_dir / CARD_FILE).write_text(card + f"\nThe LoRA adapter merged into `{base}` by `prefopt merge-adapter`.\n",
                                            encoding="utf-8")


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
