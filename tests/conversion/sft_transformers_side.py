"""The ``transformers`` side of ``test_sft_export.py``: run with ``python -I`` in a process
where ``mm1_megatron`` and ``megatron`` cannot be imported.

For every export and every case of the spec: the chat template's ids and text, the
processor's ``input_ids`` / ``pixel_values`` / ``num_tiles``, the model's logits on them
and, for cases with a ``prompt``, the processor's prompt ids and ``generate()``'s output,
saved as ``<export>-<case>.safetensors`` in the output folder.
"""

import json
import sys

BLOCKED = ("mm1_megatron", "megatron")


class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is blocked in this process", name=name)


sys.meta_path.insert(0, Block())

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)


def images_of(case, tensors):
    return [
        Image.open(image["png"]) if "png" in image else tensors[image["tensor"]]
        for image in case["images"]
    ]


def run_case(folder, case, tensors, tokenizer, processor, model):
    images = images_of(case, tensors)
    out = {}
    out["chat_ids"] = torch.tensor(tokenizer.apply_chat_template(case["messages"])["input_ids"])
    text = tokenizer.apply_chat_template(case["messages"], tokenize=False)
    batch = processor(text=text, images=images, return_tensors="pt")
    out["input_ids"], out["pixel_values"] = batch["input_ids"][0], batch["pixel_values"]
    out["num_tiles"] = batch["num_tiles"]
    with torch.no_grad():
        out["logits"] = model(**batch).logits[0]
    if "prompt" in case:
        prompt = tokenizer.apply_chat_template(
            case["prompt"], tokenize=False, add_generation_prompt=True
        )
        batch = processor(text=prompt, images=images, return_tensors="pt")
        out["prompt_ids"] = batch["input_ids"][0]
        generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
        out["generated"] = generated[0]
    return out


def main(spec_path, output):
    spec = json.loads(open(spec_path).read())
    tensors = load_file(spec["tensors"])
    for name, folder in spec["exports"].items():
        # AutoTokenizer reads config.json, whose model type is defined by the folder's code.
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        for case in spec["cases"]:
            out = run_case(folder, case, tensors, tokenizer, processor, model.eval())
            tensors_out = {key: value.contiguous() for key, value in out.items()}
            save_file(tensors_out, f"{output}/{name}-{case['name']}.safetensors")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"loaded": loaded, "processor": type(processor).__module__}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
