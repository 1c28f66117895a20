"""The files of an exported folder besides the weights: generation config, image
processor config, and a model card that lists the training configuration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

from mm1_megatron.checkpoint.layout import TRAINER_STATE_FILE
from mm1_megatron.config import MM1Config
from mm1_megatron.config.schema import VisionEncoderConfig
from mm1_megatron.conversion.target_configs import image_processor_config

USAGE = {
    "mm1": """```python
from transformers import AutoModelForImageTextToText, AutoTokenizer
# The model's code ships in this folder (auto_map): only torch and transformers are needed.
model = AutoModelForImageTextToText.from_pretrained("{path}", trust_remote_code=True)
# input_ids: each image is {num_image_tokens} copies of token {image_token_id}
output = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=20)
```

With `mm1_megatron` installed, `import mm1_megatron.hf_model.register` first and drop
`trust_remote_code`: the package's own copy of the same code is used.""",
    "llava": """```python
from transformers import LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained("{path}")  # no mm1_megatron needed
```""",
    "language-model": """```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{path}")
```""",
    "vision-encoder": """```python
from transformers import CLIPVisionModel
model = CLIPVisionModel.from_pretrained("{path}")  # last_hidden_state[:, 1:] = our features
```""",
}
PIPELINE_TAGS = {
    "mm1": "image-text-to-text",
    "llava": "image-text-to-text",
    "language-model": "text-generation",
    "vision-encoder": "image-feature-extraction",
}


def write_generation_config(
    folder: Path, special: Dict[str, int], extra_stop_ids: Sequence[int] = ()
) -> None:
    """bos / eos / pad ids; ``extra_stop_ids`` also end generation (a fine-tuned model
    closes its answers with the chat template's end-of-turn marker)."""
    from transformers import GenerationConfig

    eos = special.get("eos")
    stops = [eos, *[i for i in extra_stop_ids if i != eos]] if extra_stop_ids else eos
    GenerationConfig(
        bos_token_id=special.get("bos"),
        eos_token_id=stops,
        pad_token_id=special.get("pad"),
        do_sample=False,
    ).save_pretrained(str(folder))


def write_image_processor_config(folder: Path, vision: VisionEncoderConfig) -> None:
    path = Path(folder) / "preprocessor_config.json"
    path.write_text(json.dumps(image_processor_config(vision), indent=2) + "\n")


def _trainer_step(step_folder: Path) -> Optional[int]:
    path = step_folder / TRAINER_STATE_FILE
    return json.loads(path.read_text()).get("step") if path.is_file() else None


def write_model_card(
    folder: Path,
    *,
    fmt: str,
    cfg: MM1Config,
    step_folder: Path,
    architecture: str,
    dtype: str,
    notes: str = "",
    special: Optional[Dict[str, int]] = None,
) -> None:
    from mm1_megatron.models.param_count import count_parameters

    counts = count_parameters(cfg.model)
    step = _trainer_step(step_folder)
    special = special or {}
    usage = USAGE[fmt].format(
        path=Path(folder).name,
        image_token_id=special.get("image"),
        num_image_tokens=cfg.model.connector.num_output_tokens,
    )
    config_text = (step_folder / "config.yaml").read_text()
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {PIPELINE_TAGS[fmt]}",
        "tags:",
        "- mm1_megatron",
        "- mm1",
        "---",
        "",
        f"# {architecture} exported from mm1_megatron",
        "",
        f"Exported by `mm1 convert export --format {fmt}` from `{step_folder}`"
        + (f" (training step {step})." if step is not None else "."),
        "",
        f"- class: `{architecture}`",
        f"- dtype: {dtype}",
        f"- parameters in the training config: vision encoder {counts.vision_encoder:,}, "
        f"connector {counts.connector:,}, language model {counts.language_model:,}",
    ]
    if special:
        lines.append("- special token ids: " + ", ".join(f"{k} {v}" for k, v in special.items()))
    if notes:
        lines += ["", notes]
    lines += [
        "",
        "## Usage",
        "",
        usage,
        "",
        "## Training configuration",
        "",
        "The resolved `config.yaml` of the run:",
        "",
        "```yaml",
        config_text.rstrip(),
        "```",
        "",
    ]
    (Path(folder) / "README.md").write_text("\n".join(lines))
