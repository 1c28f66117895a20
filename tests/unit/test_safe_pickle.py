"""The allowlist unpickler for ``.metadata`` and the ``weights_only`` reader for the other
pickled checkpoint files (``mm1_megatron/compat/safe_pickle.py``): what they refuse, that
nothing of a refused file runs, and that torch's own metadata loads through them."""

from __future__ import annotations

import importlib
import io
import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata

from mm1_megatron.compat import safe_pickle
from mm1_megatron.compat.safe_pickle import (
    CheckpointFileError,
    UnsafePickleError,
    load_metadata,
    load_weights_only,
)


class Reduces:
    """Pickles as ``function(*args)``: how a hostile file makes the unpickler call things."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def marker_payload(marker: Path, genuine: Any) -> Reduces:
    """A pickle that appends to ``marker`` and then evaluates to ``genuine``, so that a
    loader running it would carry on as if nothing happened."""
    code = (
        f"(open({str(marker)!r}, 'a').write('ran\\n'), "
        f"__import__('pickle').loads(bytes.fromhex({pickle.dumps(genuine).hex()!r})))[1]"
    )
    return Reduces(eval, code)


def _load(data: bytes, source: str = "/ckpt/model_optim/.metadata") -> Any:
    return load_metadata(io.BytesIO(data), source=source)


@pytest.fixture(scope="module")
def dcp_folder(tmp_path_factory) -> Path:
    """A torch.distributed.checkpoint folder written by torch's own writer: tensors of
    several dtypes, a nested dict (planner data) and a byte item."""
    folder = tmp_path_factory.mktemp("dcp")
    state = {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "nested": {"h": torch.ones(4, dtype=torch.bfloat16), "i": torch.tensor([1, 2])},
        "extra": io.BytesIO(b"opaque"),
    }
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def test_torch_written_metadata_loads_the_same_as_with_pickle(dcp_folder):
    data = (dcp_folder / ".metadata").read_bytes()
    loaded = _load(data)
    assert isinstance(loaded, Metadata)
    assert loaded == pickle.loads(data)
    props = loaded.state_dict_metadata["nested.h"].properties
    assert props.dtype == torch.bfloat16 and props.layout == torch.strided


def test_allowlist_names_only_what_exists_in_the_installed_torch():
    for module_name, name in safe_pickle.METADATA_GLOBALS:
        assert hasattr(importlib.import_module(module_name), name), f"{module_name}.{name}"
    allowed = safe_pickle.allowed_globals()
    assert set(safe_pickle.METADATA_GLOBALS) <= set(allowed)
    dtypes = {key: v for key, v in allowed.items() if key not in safe_pickle.METADATA_GLOBALS}
    assert torch.float32 in dtypes.values() and torch.bfloat16 in dtypes.values()
    assert all(m == "torch" and isinstance(v, torch.dtype) for (m, _), v in dtypes.items())


def test_layouts_are_looked_up_not_called():
    assert safe_pickle.allowed_globals()[("torch.serialization", "_get_layout")] is not (
        torch.serialization._get_layout
    )
    layout = b"ctorch.serialization\n_get_layout\n(Vtorch.strided\ntR."
    with pytest.raises(CheckpointFileError, match="holds a layout, not a Metadata"):
        _load(layout)  # a layout is fine, but it is not a Metadata
    with pytest.raises(CheckpointFileError, match="unknown torch.layout 'os.system'"):
        _load(layout.replace(b"torch.strided", b"os.system"))


HOSTILE_CALLS = {
    "os.system": lambda m: Reduces(os.system, f"touch {m}"),
    "builtins.eval": lambda m: Reduces(eval, f"open({str(m)!r}, 'w')"),
    "builtins.exec": lambda m: Reduces(exec, f"open({str(m)!r}, 'w')"),
    "subprocess.Popen": lambda m: Reduces(subprocess.Popen, ["touch", str(m)]),
    "torch.load": lambda m: Reduces(torch.load, str(m)),
    "torch._utils._rebuild_tensor_v2": lambda m: Reduces(torch._utils._rebuild_tensor_v2, 1),
    "torch.storage._load_from_bytes": lambda m: Reduces(torch.storage._load_from_bytes, b""),
    "builtins.getattr": lambda m: Reduces(getattr, torch.Size, "__init__"),
    "builtins.__import__": lambda m: Reduces(__import__, "os"),
    "importlib.import_module": lambda m: Reduces(importlib.import_module, "os"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_CALLS))
def test_calls_outside_the_allowlist_are_refused_before_running(name, tmp_path):
    marker = tmp_path / "ran"
    hostile = HOSTILE_CALLS[name](marker)
    data = pickle.dumps(hostile)
    # The name pickle stores: os.system is posix.system, megatron-core 0.19 replaces
    # torch.storage._load_from_bytes with its own function.
    pickled_as = f"{hostile.function.__module__}.{hostile.function.__qualname__}"
    with pytest.raises(UnsafePickleError) as refused:
        _load(data)
    message = str(refused.value)
    assert "/ckpt/model_optim/.metadata" in message and "refused to unpickle" in message
    assert message.split("refused to unpickle ")[1].split(" ")[0] == pickled_as
    assert isinstance(refused.value, ValueError) and not marker.exists()


def test_the_real_payload_shape_is_refused_and_does_not_run(dcp_folder, tmp_path):
    marker = tmp_path / "ran"
    genuine = pickle.loads((dcp_folder / ".metadata").read_bytes())
    data = pickle.dumps(marker_payload(marker, genuine))
    pickle.loads(data)  # the payload works when unpickled the way torch does
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        _load(data)
    assert not marker.exists()


class Custom:
    def __reduce__(self):
        return (Custom, ())


def test_any_other_class_and_persistent_ids_are_refused():
    with pytest.raises(UnsafePickleError, match=f"{__name__}.Custom"):
        _load(pickle.dumps(Custom()))
    with pytest.raises(UnsafePickleError, match="collections.OrderedDict"):
        _load(pickle.dumps({"a": __import__("collections").OrderedDict()}))

    class WithPersistentIds(pickle.Pickler):
        def persistent_id(self, obj):
            return "id" if isinstance(obj, str) else None

    stream = io.BytesIO()
    WithPersistentIds(stream).dump(["x"])
    with pytest.raises(UnsafePickleError, match="persistent id"):
        _load(stream.getvalue())


def test_setting_attributes_of_an_allowed_class_is_refused_and_undone():
    # GLOBAL Metadata, then BUILD with slot state {"__eq__": 1}: sets Metadata.__eq__.
    data = (
        b"\x80\x04ctorch.distributed.checkpoint.metadata\nMetadata\n"
        b"N}\x8c\x06__eq__\x94K\x01s\x86b."
    )
    before = Metadata.__eq__
    with pytest.raises(UnsafePickleError, match="attribute changes to Metadata"):
        _load(data)
    assert Metadata.__eq__ is before


def test_storage_entries_must_name_files_of_the_folder(dcp_folder):
    metadata = pickle.loads((dcp_folder / ".metadata").read_bytes())
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../etc/passwd"
    with pytest.raises(CheckpointFileError, match="points outside its folder"):
        _load(pickle.dumps(metadata))


@pytest.mark.parametrize(
    "data",
    [os.urandom(2000), b"", pickle.dumps(torch.Size([1, 2])), pickle.dumps([1]) + b"junk"],
    ids=["random", "empty", "a_size", "a_list_then_junk"],
)
def test_garbage_is_a_clear_error_naming_the_file(data):
    with pytest.raises(CheckpointFileError, match=r"/ckpt/model_optim/\.metadata"):
        _load(data)


def test_weights_only_files_refuse_globals_and_garbage(tmp_path):
    marker = tmp_path / "ran"
    hostile = io.BytesIO()
    torch.save(marker_payload(marker, {"a": 1}), hostile)
    hostile.seek(0)
    with pytest.raises(UnsafePickleError, match=r"common\.pt: refused to unpickle eval \("):
        load_weights_only(hostile, source="/ckpt/common.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointFileError, match=r"/ckpt/common\.pt is not a readable") as bad:
        load_weights_only(io.BytesIO(os.urandom(1900)), source="/ckpt/common.pt")
    with pytest.raises(CheckpointFileError, match="not a zip archive") as raw:
        load_weights_only(io.BytesIO(pickle.dumps(Reduces(eval, "1"))), source="/ckpt/common.pt")
    for message in (str(bad.value), str(raw.value)):
        assert "weights_only` set to `False`" not in message and "\n" not in message
    genuine = io.BytesIO()
    torch.save({"param_groups": [{"lr": 0.1}], "t": torch.ones(2)}, genuine)
    genuine.seek(0)
    assert load_weights_only(genuine, source="x")["param_groups"] == [{"lr": 0.1}]


def test_a_refusal_inside_torchs_load_is_found_on_any_rank():
    from torch.distributed.checkpoint import CheckpointException

    refused = UnsafePickleError("/c/.metadata: refused to unpickle builtins.eval")
    wrapped = CheckpointException("read", {1: (refused, None), 0: (RuntimeError("other"), None)})
    assert safe_pickle.checkpoint_file_error_in(wrapped) is refused
    assert safe_pickle.checkpoint_file_error_in(CheckpointException("x", {})) is None
    # It crosses ranks pickled: the class and the message survive.
    copied = pickle.loads(pickle.dumps(refused))
    assert type(copied) is UnsafePickleError and str(copied) == str(refused)


def test_load_refuses_before_torchs_load_and_unwraps_refusals_from_inside(tmp_path):
    from torch.distributed.checkpoint import CheckpointException

    from mm1_megatron.compat.checkpointing import _reporting_refusals

    calls, inner = [], {}

    def stand_in_load(sharded_state_dict, checkpoint_dir, strict=None):
        calls.append(checkpoint_dir)
        raise CheckpointException("read", {0: (inner["error"], None)})

    load = _reporting_refusals(stand_in_load)
    inner["error"] = UnsafePickleError("/c/__0_0.distcp (item x): refused to unpickle os.system")
    with pytest.raises(UnsafePickleError, match="os.system"):
        load({}, str(tmp_path))
    inner["error"] = RuntimeError("something else")
    with pytest.raises(CheckpointException):
        load({}, checkpoint_dir=str(tmp_path))
    assert len(calls) == 2
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Reduces(eval, "1")))
    with pytest.raises(UnsafePickleError, match=r"\.metadata: refused to unpickle builtins.eval"):
        load({}, str(tmp_path))
    assert len(calls) == 2  # refused before torch's load started


def test_gpu_processes_install_the_safe_readers_too(monkeypatch):
    from mm1_megatron.compat import checkpointing, install

    installed = []
    monkeypatch.setattr(checkpointing, "install_safe_loading", lambda: installed.append(True))
    install.install_patches(cuda_available=True)
    assert installed == [True]
