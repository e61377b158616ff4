"""Crafted DCP ``.metadata`` must be refused before it can change anything in the process.

Each payload is hand-assembled pickle bytes (as an attacker would write them). For each one the loader must raise a
one-line ``UnsafeCheckpointError``/``ValueError`` AND every class, enum member and function the loader allows must
be exactly as before; afterwards an intact checkpoint still loads in the same process.
"""

from __future__ import annotations

import copyreg
import io
import pathlib
import pickle
import struct

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_meta
from torch.distributed.checkpoint import planner as dcp_planner

from ftrain.checkpoint.safe_load import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    UnsafeCheckpointError,
    read_metadata_safely,
)

# -- a tiny pickle assembler --------------------------------------------------------------------------------------

META = "torch.distributed.checkpoint.metadata"


def text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def glob(module: str, name: str) -> bytes:
    """GLOBAL (protocol 0 form, read by every protocol)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def stack_glob(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4: the name may be dotted)."""
    return text(module) + text(name) + b"\x93"


def integer(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def dict_of(**items: bytes) -> bytes:
    return b"}(" + b"".join(text(k) + v for k, v in items.items()) + b"u"


def tuple_of(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


NONE, EMPTY_TUPLE, REDUCE, BUILD, NEWOBJ = b"N", b")", b"R", b"b", b"\x81"


def program(*parts: bytes) -> bytes:
    return b"\x80\x04" + b"".join(parts) + b"."


def slot_build(**items: bytes) -> bytes:
    """BUILD with (None, {name: value}): pickle calls setattr(target, name, value) for each."""
    return tuple_of(NONE, dict_of(**items)) + BUILD


ENUM_MEMBER = glob(META, "_MEM_FORMAT_ENCODING") + tuple_of(integer(0)) + REDUCE
LOAD_ITEM = glob("torch.distributed.checkpoint.planner", "LoadItemType") + tuple_of(integer(1)) + REDUCE
FRESH_METADATA = glob(META, "Metadata") + EMPTY_TUPLE + NEWOBJ

PAYLOADS = {
    # BUILD on a class sets attributes process-wide: the case, and variants
    "BUILD slots on PosixPath class": program(glob("pathlib", "PosixPath"), slot_build(__truediv__=NONE)),
    "BUILD slots on PurePosixPath class": program(glob("pathlib", "PurePosixPath"), slot_build(__fspath__=NONE)),
    "BUILD slots on Metadata class": program(glob(META, "Metadata"), slot_build(__eq__=NONE)),
    "BUILD dict on Metadata class": program(glob(META, "Metadata"), dict_of(__init__=NONE), BUILD),
    "BUILD on TensorProperties class": program(glob(META, "TensorProperties"), tuple_of(NONE, NONE), BUILD),
    "BUILD slots on torch.Size class": program(glob("torch", "Size"), slot_build(numel=NONE)),
    "BUILD slots on a dtype": program(glob("torch", "float32"), slot_build(itemsize=integer(3))),
    "BUILD slots on an enum class": program(glob(META, "_MEM_FORMAT_ENCODING"), slot_build(_missing_=NONE)),
    # BUILD on shared instances (enum members are singletons)
    "BUILD slots on an enum member": program(ENUM_MEMBER, slot_build(_value_=integer(7))),
    "BUILD dict on an enum member": program(LOAD_ITEM, dict_of(_value_=integer(9), _name_=text("X")), BUILD),
    "BUILD on the layout function": program(
        glob("torch.serialization", "_get_layout"), slot_build(cache=dict_of(x=NONE))
    ),
    # BUILD on a fresh record, but with names that are not its fields
    "BUILD __class__ on a fresh record": program(FRESH_METADATA, slot_build(__class__=glob("pathlib", "PosixPath"))),
    "BUILD __setstate__ on a fresh record": program(FRESH_METADATA, dict_of(__setstate__=glob("torch", "Size")), BUILD),
    "BUILD a list state on a fresh record": program(FRESH_METADATA, b"]", BUILD),
    "BUILD bad tuple on TensorProperties": program(
        glob(META, "TensorProperties"), EMPTY_TUPLE, NEWOBJ, tuple_of(NONE, NONE, NONE, NONE, NONE), BUILD
    ),
    # globals that are functions or classes outside the allow-list, plainly or nested in dotted names
    "REDUCE builtins.setattr": program(
        glob("builtins", "setattr"), tuple_of(glob("pathlib", "PosixPath"), text("__truediv__"), NONE), REDUCE
    ),
    "object.__setattr__ dotted": program(stack_glob("builtins", "object.__setattr__")),
    "Metadata.__init__ dotted": program(stack_glob(META, "Metadata.__init__.__globals__")),
    "PosixPath.__truediv__ dotted": program(stack_glob("pathlib", "PosixPath.__truediv__")),
    "functools.partial": program(
        glob("functools", "partial"), tuple_of(glob("builtins", "setattr"), glob("pathlib", "PosixPath")), REDUCE
    ),
    "copyreg._reconstructor": program(
        glob("copyreg", "_reconstructor"), tuple_of(glob("pathlib", "PosixPath"), glob("builtins", "object"), NONE),
        REDUCE,
    ),
    "copyreg.__newobj__": program(glob("copyreg", "__newobj__"), tuple_of(glob("pathlib", "PosixPath")), REDUCE),
    "builtins.getattr": program(glob("builtins", "getattr")),
    "torch.save": program(glob("torch", "save")),
    "os.system": program(glob("os", "system"), tuple_of(text("true")), REDUCE),
    # opcodes DCP never writes
    "INST": program(b"(", b"ipathlib\nPosixPath\n"),
    "OBJ": program(b"(", glob("pathlib", "PosixPath"), b"o"),
    "NEWOBJ_EX": program(glob(META, "Metadata"), EMPTY_TUPLE, b"}", b"\x92"),
    "EXT1 (registered extension)": program(b"\x82\xf0"),
    "PERSID": program(b"Pfoo\n"),
    # allowed constructors with hostile arguments
    "NEWOBJ of a non-record": program(glob("pathlib", "PosixPath"), EMPTY_TUPLE, NEWOBJ),
    "NEWOBJ of a record with args": program(glob(META, "Metadata"), tuple_of(text("x")), NEWOBJ),
    "REDUCE of a record class": program(glob(META, "Metadata"), tuple_of(dict_of()), REDUCE),
    "REDUCE enum functional API": program(
        glob("torch.distributed.checkpoint.planner", "LoadItemType"), tuple_of(text("Evil"), text("A B")), REDUCE
    ),
    "REDUCE layout of torch.save": program(glob("torch.serialization", "_get_layout"), tuple_of(text("save")), REDUCE),
    "REDUCE Size of a string": program(glob("torch", "Size"), tuple_of(text("abc")), REDUCE),
    "REDUCE OrderedDict of a dict": program(glob("collections", "OrderedDict"), tuple_of(dict_of(a=NONE)), REDUCE),
    "REDUCE PosixPath of an int": program(glob("pathlib", "PosixPath"), tuple_of(integer(5)), REDUCE),
    "REDUCE Size with kwargs-ish": program(glob("torch", "Size"), dict_of(), REDUCE),
    # adding items to things that are not fresh containers
    "SETITEM on an enum member": program(ENUM_MEMBER, text("k"), NONE, b"s"),
    "SETITEMS on a class": program(glob(META, "Metadata"), b"(", text("k"), NONE, b"u"),
    "APPEND on a class": program(glob("collections", "OrderedDict"), NONE, b"a"),
    # not metadata at all
    "a plain dict": program(dict_of(a=NONE)),
    "an enum member": program(ENUM_MEMBER),
}


def shared_state() -> dict:
    """Every attribute of every class, enum member and function the loader lets a pickle name."""
    classes = [
        pathlib.PosixPath, pathlib.PurePosixPath, pathlib.PurePath, pathlib.Path,
        torch.Size, dcp_meta._MEM_FORMAT_ENCODING, dcp_planner.LoadItemType, dcp_planner.WriteItemType,
        dcp_meta.Metadata, dcp_meta.TensorStorageMetadata, dcp_meta.BytesStorageMetadata,
        dcp_meta.ChunkStorageMetadata, dcp_meta.MetadataIndex, dcp_meta.TensorProperties, dcp_meta.StorageMeta,
    ]
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    classes.append(_StorageInfo)
    state = {f"{c.__qualname__}.{k}": v for c in classes for k, v in vars(c).items()}
    for enum in (dcp_meta._MEM_FORMAT_ENCODING, dcp_planner.LoadItemType, dcp_planner.WriteItemType):
        for member in enum:
            state.update({f"{member!r}.{k}": v for k, v in vars(member).items()})
    state.update({f"_get_layout.{k}": v for k, v in vars(torch.serialization._get_layout).items()})
    return state


def same(before: dict, after: dict) -> list[str]:
    changed = {k for k in before.keys() | after.keys() if before.get(k, same) is not after.get(k, same)}
    return sorted(changed)


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    """A real DCP checkpoint (tensors, bytes entries, nested dicts) and the state it holds."""
    path = tmp_path_factory.mktemp("intact") / "step_1"
    state = {
        "model": {"w": torch.randn(4, 3), "b": torch.arange(5, dtype=torch.bfloat16)},
        "train": {"step": 7, "name": "run", "lr": [0.1, 0.2]},
    }
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return path, state


def load_intact(path: pathlib.Path, state: dict) -> None:
    target = {"model": {"w": torch.zeros(4, 3), "b": torch.zeros(5, dtype=torch.bfloat16)},
              "train": {"step": 0, "name": "", "lr": []}}
    dcp.load(target, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(), no_dist=True)
    assert torch.equal(target["model"]["w"], state["model"]["w"])
    assert torch.equal(target["model"]["b"], state["model"]["b"])
    assert target["train"] == state["train"]


@pytest.fixture
def extension_code():
    """A copyreg extension code that names builtins.setattr, as a crafted environment might register."""
    copyreg.add_extension("builtins", "setattr", 0xF0)
    yield
    copyreg.remove_extension("builtins", "setattr", 0xF0)


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_crafted_metadata_is_refused_and_changes_nothing(payload, intact, extension_code):
    before = shared_state()
    with pytest.raises(ValueError, match="^checkpoint metadata ") as refused:
        read_metadata_safely(io.BytesIO(payload))
    message = str(refused.value)
    assert "\n" not in message and len(message) < 300, message
    assert same(before, shared_state()) == [], "a refused checkpoint changed the process"
    path, state = intact
    load_intact(path, state)  # the fallback to an intact checkpoint still works in this process


@pytest.mark.parametrize(
    "payload",
    ["BUILD slots on PosixPath class", "BUILD slots on an enum member", "BUILD slots on Metadata class"],
)
def test_attacks_that_an_unrestricted_loader_would_let_through_are_refused_as_unsafe(payload):
    with pytest.raises(UnsafeCheckpointError, match="BUILD on anything but a record it just created"):
        read_metadata_safely(io.BytesIO(PAYLOADS[payload]))


def test_a_real_checkpoints_metadata_loads_the_same_as_with_pickle(intact):
    path, state = intact
    raw = (path / ".metadata").read_bytes()
    safe = read_metadata_safely(io.BytesIO(raw))
    assert safe == pickle.loads(raw)
    assert isinstance(safe.storage_meta.checkpoint_id, pathlib.PosixPath)
    assert {type(p.properties.memory_format) for p in safe.state_dict_metadata.values()
            if isinstance(p, dcp_meta.TensorStorageMetadata)} == {torch.memory_format}
    load_intact(path, state)


def test_metadata_of_every_protocol_and_torch_layout_loads(intact):
    path, _ = intact
    metadata = pickle.loads((path / ".metadata").read_bytes())
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert read_metadata_safely(io.BytesIO(pickle.dumps(metadata, protocol=protocol))) == metadata


def test_truncated_metadata_is_a_one_line_error(intact):
    path, _ = intact
    raw = (path / ".metadata").read_bytes()
    for cut in (0, 1, len(raw) // 3, len(raw) - 1):
        with pytest.raises(ValueError, match="^checkpoint metadata is unreadable: ") as refused:
            read_metadata_safely(io.BytesIO(raw[:cut]))
        assert "\n" not in str(refused.value)
