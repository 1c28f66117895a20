"""The ``transformers`` side of ``test_sft_export.py`` and ``test_pipeline.py``: run with
``python -I`` in a process where ``mm1_megatron`` and ``megatron`` cannot be imported.

``sft_transformers_side.py SPEC OUTPUT``: for every export and every case of the spec,
the chat template's ids and text, the processor's ``input_ids`` / ``pixel_values`` /
``num_tiles``, the model's logits on them and, for cases with a ``prompt``, the
processor's prompt ids and ``generate()``'s output, saved as
``<export>-<case>.safetensors`` in the output folder.

``sft_transformers_side.py pipeline SPEC OUTPUT``: every case through
``pipeline("image-text-to-text", trust_remote_code=True)`` (new text, full output, token
ids) and through the processor and ``model.generate`` (token ids, new text), as JSON.
The spec's ``logits_cases`` (text and image files; used by ``test_native_export.py``)
go through ``AutoProcessor`` / ``AutoModelForImageTextToText`` loaded with
``trust_remote_code=True``: the processor's outputs, the logits on them and greedy
``generate()``'s tokens, saved as ``<case>.safetensors`` next to OUTPUT.
"""

import json
import sys
from pathlib import Path

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
    pipeline,
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


def image_paths(messages):
    """The images of chat ``messages``, in order (``{"type": "image", "path": ...}``)."""
    return [
        part["path"]
        for message in messages
        if not isinstance(message["content"], str)
        for part in message["content"]
        if part["type"] == "image"
    ]


def pipeline_answers(pipe, inputs, max_new_tokens):
    """The pipeline's new text, full output and token ids; greedy by the export's
    generation config (``do_sample: false``)."""
    run = dict(inputs, max_new_tokens=max_new_tokens)
    ids = pipe(**run, return_tensors=True)[0]["generated_token_ids"]
    return {
        "new_text": pipe(**run, return_full_text=False)[0]["generated_text"],
        "full": pipe(**run)[0]["generated_text"],
        "ids": ids.tolist(),
    }


def generate_answer(pipe, prompt, images, max_new_tokens):
    """``model.generate`` on the processor's output for ``prompt`` and ``images``."""
    batch = pipe.processor(text=prompt, images=[Image.open(p) for p in images], return_tensors="pt")
    with torch.no_grad():
        generated = pipe.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    prompt_length = batch["input_ids"].shape[1]
    return {
        "prompt_length": prompt_length,
        "reference_ids": generated[0].tolist(),
        "reference_text": pipe.tokenizer.decode(
            generated[0, prompt_length:], skip_special_tokens=True
        ),
    }


def pipeline_case(pipe, case, max_new_tokens):
    if "messages" in case:
        inputs, images = {"text": case["messages"]}, image_paths(case["messages"])
        prompt = pipe.tokenizer.apply_chat_template(
            case["messages"], tokenize=False, add_generation_prompt=True
        )
    else:
        inputs = {"images": case["images"], "text": case["text"]}
        images, prompt = case["images"], case["text"]
    return {
        **pipeline_answers(pipe, inputs, max_new_tokens),
        **generate_answer(pipe, prompt, images, max_new_tokens),
    }


def logits_case(processor, model, case, max_new_tokens):
    """The processor's outputs for the case's text and image files, the logits on them
    and greedy ``generate()``'s tokens (prompt included)."""
    images = [Image.open(path) for path in case["images"]]
    batch = processor(text=case["text"], images=images, return_tensors="pt")
    out = {key: value[0] if key == "input_ids" else value for key, value in batch.items()}
    with torch.no_grad():
        out["logits"] = model(**batch).logits[0]
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    out["generated"] = generated[0]
    return {key: value.contiguous() for key, value in out.items()}


def run_logits_cases(folder, cases, max_new_tokens, output):
    """``logits_case`` of each case, saved as ``<case>.safetensors`` next to ``output``."""
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    for case in cases:
        tensors = logits_case(processor, model, case, max_new_tokens)
        save_file(tensors, str(Path(output).with_name(f"{case['name']}.safetensors")))
    return {type(model).__module__, type(processor).__module__}


def pipeline_main(spec_path, output):
    spec = json.loads(open(spec_path).read())
    results, classes = {}, set()
    for name, folder in spec["exports"].items():
        pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
        classes |= {type(pipe.model).__module__, type(pipe.processor).__module__}
        for case in spec["cases"]:
            if case["export"] == name:
                results[case["name"]] = pipeline_case(pipe, case, spec["max_new_tokens"])
        logits_cases = [c for c in spec.get("logits_cases", []) if c["export"] == name]
        if logits_cases:
            classes |= run_logits_cases(folder, logits_cases, spec["max_new_tokens"], output)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    report = {"loaded": loaded, "classes": sorted(classes), "cases": results}
    open(output, "w").write(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1] == "pipeline":
        pipeline_main(*sys.argv[2:4])
    else:
        main(*sys.argv[1:3])
