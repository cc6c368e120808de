"""Every bad input has a test: one table of users' mistakes and damaged files, across every command.

The contract is the same for each case: the command exits with the case's code; stderr holds exactly one
`error:` line, which says what to do next, and no traceback (notes and warnings may come before it); nothing
in the case's directory is written, overwritten or removed; and no process the command started is left
running. Where a runner is not nnwheel's CLI:

- "installed" runs `python -m nnwheel` in a new process that finds the digits model installed in the case's
  directory (site/, on PYTHONPATH), so that a case can damage its own copy;
- "package" runs that model's own command line (`python -m digits_mlp`);
- "api" runs Python code that calls the package: there the contract is an exception of the class the package
  documents (ValueError, IntegrityError), its message saying what to do, and nothing written.

Argparse's own refusals (an option's type) print their usage first: they are the "usage" cases, with exit 2
and argparse's one `error:` line last. Single cases of many of these classes live in test_wrap_errors.py,
test_index.py, test_publish.py, test_deploy.py, test_serve.py and test_damaged.py; this table covers the
classes systematically. Shared by all: one wrapped model, one devpi-server and index, one busy port.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import EXAMPLE, DevpiIndex, free_port, tiny_model_wheel
from test_filemap import skip_without_leases

from nnwheel.cli import main

pytestmark = pytest.mark.e2e
# Set for every process a case starts: found in /proc, it tells one left running, even detached from this one.
MARKER = "NNWHEEL_BAD_INPUT"


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  # shell words, once World.filled has replaced its {placeholders}; Python code for "api"
    code: int
    says: str  # what the error line must hold: for most cases, what to do next
    given: tuple = ()  # functions that lay out the case's directory beforehand (below)
    runner: str = "nnwheel"
    raises: str = ""  # for "api": the exception's class


@dataclass
class World:
    """What a case runs in: its own directory, and what the module shares."""

    dir: Path  # the working directory, compared before and after
    home: Path  # $HOME (~/.pypirc)
    shared: Shared

    def filled(self, argv: str) -> str:
        """argv with its {placeholders} replaced by what the module shares."""
        values = {"wheel": WHEEL_NAME, "busy": self.shared.busy_port, "closed": self.shared.closed_url,
                  "index": self.shared.index.url, "simple": self.shared.index.simple_url, "user": self.shared.index.user}
        for name, value in values.items():
            argv = argv.replace(f"{{{name}}}", str(value))
        return argv


@dataclass(frozen=True)
class Shared:
    digits_wheel: Path
    installed: Path  # the digits wheel installed by pip into a folder of its own (--target)
    index: DevpiIndex  # it holds tiny-released 0.1.0
    busy_port: int  # something listens there
    closed_url: str  # nothing listens there


# --- What a case's directory holds beforehand: each function lays out one bad input in World.dir -----------

WHEEL_NAME = "digits_mlp-0.1.0-py3-none-any.whl"


def checkpoint(w: World) -> None:
    """The bundled example: model.pth, and its class in model.py."""
    shutil.copy(EXAMPLE / "model.pth", w.dir)
    shutil.copy(EXAMPLE / "model.py", w.dir)


def folder(w: World) -> None:
    (w.dir / "folder").mkdir()
    (w.dir / "folder" / "notes.txt").write_text("not a checkpoint\n")


def empty_checkpoint(w: World) -> None:
    (w.dir / "empty.pth").write_bytes(b"")


def noise(w: World) -> None:
    (w.dir / "noise.pth").write_bytes(random.Random(18).randbytes(4096))


def cut_state_dict(w: World) -> None:
    data = (EXAMPLE / "model.pth").read_bytes()
    (w.dir / "cut.pth").write_bytes(data[: len(data) // 2])


class _RunsCode:
    """Unpickled by anything but a weights-only loader, it would create a file."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def evil_pickle(w: World) -> None:
    import torch

    torch.save({"weight": torch.zeros(1), "payload": _RunsCode()}, w.dir / "evil.pth")


def whole_module(w: World) -> None:
    import torch

    torch.save(torch.nn.Sequential(torch.nn.Linear(64, 10)), w.dir / "whole.pth")


def bad_safetensors(w: World) -> None:
    (w.dir / "bad.safetensors").write_bytes(struct.pack("<Q", 20) + b"{not json at all...." + bytes(40))


def fake_onnx(w: World) -> None:
    """The first bytes of an ONNX ModelProto, then noise."""
    (w.dir / "fake.onnx").write_bytes(bytes([0x08, 0x07, 0x12, 0x05]) + random.Random(1).randbytes(200))


def onnx_without_its_data(w: World) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 10), np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weight"], ["output"])], "digits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 10])], [weight],
    )  # fmt: skip
    onnx.save_model(helper.make_model(graph), w.dir / "external.onnx", save_as_external_data=True,
                    location="external.onnx.data", size_threshold=0)  # fmt: skip
    (w.dir / "external.onnx.data").unlink()


def cut_torchscript(w: World) -> None:
    import torch

    torch.jit.script(torch.nn.Linear(64, 10)).save(str(w.dir / "whole.ts.pt"))
    data = (w.dir / "whole.ts.pt").read_bytes()
    (w.dir / "cut.ts.pt").write_bytes(data[: len(data) // 2])
    (w.dir / "whole.ts.pt").unlink()


def old_pt2(w: World) -> None:
    with zipfile.ZipFile(w.dir / "old.pt2", "w") as archive:
        archive.writestr("model/archive_format", "pt2")


def fake_h5(w: World) -> None:
    (w.dir / "fake.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + random.Random(2).randbytes(300))


def bad_hf_dir(w: World) -> None:
    (w.dir / "hf").mkdir()
    (w.dir / "hf" / "config.json").write_text("{nope")


def tagger_config(w: World) -> None:
    """A token classifier's config.json alone: --task is checked against the architecture before anything else."""
    (w.dir / "tagger").mkdir()
    (w.dir / "tagger" / "config.json").write_text(json.dumps({"architectures": ["BertForTokenClassification"], "model_type": "bert"}))


def own_code_config(w: World) -> None:
    """A config.json whose auto_map names code that comes with the directory (trust_remote_code)."""
    (w.dir / "own").mkdir()
    (w.dir / "own" / "config.json").write_text(json.dumps({"model_type": "mine", "auto_map": {"AutoModel": "modeling_mine.Mine"}}))


def broken_arch(w: World) -> None:
    (w.dir / "broken.py").write_text("import torch\nclass Net(torch.nn.Module:\n    pass\n")


def plain_class(w: World) -> None:
    (w.dir / "plain.py").write_text("class Plain:\n    pass\n")


def raising_arch(w: World) -> None:
    (w.dir / "raising.py").write_text(
        "import torch\nclass Raising(torch.nn.Module):\n    def __init__(self):\n        raise RuntimeError('boom')\n"
    )


def net_importing_a_sibling(w: World) -> None:
    import torch

    (w.dir / "layers.py").write_text("import torch\nBlock = torch.nn.Linear\n")
    (w.dir / "net.py").write_text(
        "import torch\nfrom layers import Block\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.block = Block(64, 10)\n\n    def forward(self, x):\n"
        "        return self.block(x)\n"
    )
    torch.save({"block.weight": torch.zeros(10, 64), "block.bias": torch.zeros(10)}, w.dir / "net.pth")


def renamed_keys(w: World) -> None:
    import torch

    state = torch.load(EXAMPLE / "model.pth", weights_only=True)
    state["extra.weight"] = state.pop("layers.2.weight")
    torch.save(state, w.dir / "renamed.pth")


def npy_of_objects(w: World) -> None:
    import numpy as np

    np.save(w.dir / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)


def pt_of_a_dict(w: World) -> None:
    import torch

    torch.save({"x": torch.zeros(1, 64)}, w.dir / "dict.pt")


def other_wheel_in_dist(w: World) -> None:
    (w.dir / "dist").mkdir()
    (w.dir / "dist" / "digits_x-0.1.0-py3-none-any.whl").write_bytes(b"another model's wheel of the same name")


def the_digits_wheel(w: World) -> None:
    shutil.copy(w.shared.digits_wheel, w.dir / WHEEL_NAME)


def _rewritten_wheel(w: World, change: dict[str, bytes | None]) -> None:
    """The digits wheel with members replaced (None: left out)."""
    with zipfile.ZipFile(w.shared.digits_wheel) as source, zipfile.ZipFile(w.dir / WHEEL_NAME, "w") as copy:
        for item in source.infolist():
            name = item.filename.rpartition("/")[2]
            data = change.get(name, source.read(item))
            if data is not None:
                copy.writestr(item, data)


def wheel_of_noise(w: World) -> None:
    (w.dir / WHEEL_NAME).write_bytes(random.Random(3).randbytes(1000))


def plain_wheel(w: World) -> None:
    _rewritten_wheel(w, {"nnwheel.json": None})


def wheel_with_corrupt_manifest(w: World) -> None:
    _rewritten_wheel(w, {"nnwheel.json": b"{"})


def wheel_with_changed_weights(w: World) -> None:
    with zipfile.ZipFile(w.shared.digits_wheel) as source:
        weights = bytearray(source.read("digits_mlp/model.safetensors"))
    weights[-1] ^= 1
    _rewritten_wheel(w, {"model.safetensors": bytes(weights)})


def malformed_pypirc(w: World) -> None:
    (w.home / ".pypirc").write_text("[distutils\nindex-servers = pypi\n")


def other_content_of_a_released_wheel(w: World) -> None:
    """tiny-released 0.1.0, which the index holds, with other content."""
    wheel = tiny_model_wheel(w.dir.parent, name="tiny-released", answer=2)
    shutil.copy(wheel, w.dir)


def corrupt_index_json(w: World) -> None:
    (w.dir / "idx").mkdir()
    (w.dir / "idx" / "index.json").write_text("{")


def installed(w: World) -> None:
    """The digits model, installed by pip into site/ (on PYTHONPATH for the "installed", "package" and "api" runners)."""
    shutil.copytree(w.shared.installed, w.dir / "site")


def installed_manifest_cut(w: World) -> None:
    manifest = w.dir / "site" / "digits_mlp" / "nnwheel.json"
    manifest.write_bytes(manifest.read_bytes()[:100])


def installed_weights_changed(w: World) -> None:
    weights = w.dir / "site" / "digits_mlp" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))


def installed_weights_removed(w: World) -> None:
    (w.dir / "site" / "digits_mlp" / "model.safetensors").unlink()


def installed_weights_cut(w: World) -> None:
    weights = w.dir / "site" / "digits_mlp" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def short_rows(w: World) -> None:
    (w.dir / "short.json").write_text("[[1, 2]]")


def string_rows(w: World) -> None:
    (w.dir / "strings.json").write_text(json.dumps([["a"] * 64]))


def rows(w: World) -> None:
    (w.dir / "rows.json").write_text(json.dumps([[0.5] * 64]))



def nine_labels(w: World) -> None:
    (w.dir / "nine.txt").write_text("".join(f"{digit}\n" for digit in range(9)))


def raising_preprocess(w: World) -> None:
    (w.dir / "steps.py").write_text("def prepare(raw):\n    raise ValueError('pixels are 0-16')\n")
    (w.dir / "raw.json").write_text(json.dumps([0] * 64))


def wrap(extra: str = "", file: str = "model.pth") -> str:
    """The digits model's wrap command, with extra or replaced options."""
    base = f"wrap {file} --name digits-x --arch model.py:DigitsMLP --input-shape -1,64"
    return f"{base} {extra}".strip()


CKPT = (checkpoint,)
INSTALLED = (installed,)

CASES = [
    # --- wrap: the checkpoint --------------------------------------------------------------------------
    Case("wrap/checkpoint-missing", wrap(file="nope.pth"), 1, "check the path of the checkpoint", CKPT),
    Case("wrap/checkpoint-is-a-directory", wrap(file="folder"), 1, "pass a checkpoint file", (*CKPT, folder)),
    Case("wrap/checkpoint-empty", wrap(file="empty.pth"), 1, "save it again", (*CKPT, empty_checkpoint)),
    Case("wrap/checkpoint-random-bytes", wrap(file="noise.pth"), 1, "save or copy it again", (*CKPT, noise)),
    Case("wrap/state-dict-cut-short", wrap(file="cut.pth"), 1, "save or copy it again", (*CKPT, cut_state_dict)),
    Case("wrap/pickle-that-runs-code", wrap(file="evil.pth"), 1, "torch.save(model.state_dict()", (*CKPT, evil_pickle)),
    Case("wrap/pickled-nn-module", wrap(file="whole.pth"), 1, "torch.export", (*CKPT, whole_module)),
    Case("wrap/safetensors-header-not-json", wrap(file="bad.safetensors"), 1, "corrupt or truncated safetensors",
         (*CKPT, bad_safetensors)),
    Case("wrap/onnx-not-a-model", "wrap fake.onnx --name digits-x", 1, "export it again", (fake_onnx,)),
    Case("wrap/onnx-external-data-missing", "wrap external.onnx --name digits-x", 1, "external.onnx.data",
         (onnx_without_its_data,)),
    Case("wrap/torchscript-cut-short", "wrap cut.ts.pt --name digits-x --input-shape -1,64", 1, "save or copy it again",
         (cut_torchscript,)),
    Case("wrap/pt2-old-layout", "wrap old.pt2 --name digits-x", 1, "export the model again", (old_pt2,)),
    Case("wrap/keras-h5-not-hdf5", "wrap fake.h5 --name digits-x", 1, "Keras cannot load the model", (fake_h5,)),
    Case("wrap/huggingface-config-not-json", "wrap hf --name digits-x", 1, "save the model again", (bad_hf_dir,)),
    Case("wrap/huggingface-task-the-model-cannot-do", "wrap tagger --name digits-x --task image-classification", 2,
         "which can do token-classification, feature-extraction", (tagger_config,)),
    Case("wrap/huggingface-remote-code-without-the-flag", "wrap own --name digits-x", 1, "wrap with --trust-remote-code",
         (own_code_config,)),
    Case("wrap/task-for-a-state-dict", wrap("--task feature-extraction"), 2, "--task is for Hugging Face model directories",
         CKPT),
    # --- wrap: names, versions, metadata ----------------------------------------------------------------
    Case("wrap/name-not-a-package-name", wrap("--name=-bad-"), 2, "is not a valid package name", CKPT),
    Case("wrap/name-of-the-standard-library", wrap("--name json"), 2, "standard library", CKPT),
    Case("wrap/name-that-hides-torch", wrap("--name torch"), 2, "would hide that module", CKPT),
    Case("wrap/version-not-pep440", wrap("--version one"), 2, "PEP 440", CKPT),
    Case("wrap/requires-not-a-requirement", wrap("--requires 'torch>>=1'"), 2, "e.g. 'pillow>=10'", CKPT),
    Case("wrap/readme-missing", wrap("--readme nope.md"), 2, "--readme nope.md cannot be read", CKPT),
    Case("wrap/license-not-spdx", wrap("--license 'not a license!!'"), 2, "use an SPDX expression", CKPT),
    # --- wrap: the architecture -------------------------------------------------------------------------
    Case("wrap/arch-without-class", wrap("--arch model.py"), 2, "write it as FILE.py:CLASS", CKPT),
    Case("wrap/arch-file-missing", wrap("--arch nope.py:DigitsMLP"), 1, "give the .py file that defines DigitsMLP", CKPT),
    Case("wrap/arch-class-missing", wrap("--arch model.py:Nope"), 1, "check the name after the colon", CKPT),
    Case("wrap/arch-syntax-error", wrap("--arch broken.py:Net"), 1, "broken.py is not valid Python (line 2", (*CKPT, broken_arch)),
    Case("wrap/arch-not-a-module", wrap("--arch plain.py:Plain"), 1, "Plain is not a torch.nn.Module", (*CKPT, plain_class)),
    Case("wrap/arch-constructor-raises", wrap("--arch raising.py:Raising"), 1, "Check --arch-kwargs", (*CKPT, raising_arch)),
    Case("wrap/arch-kwargs-not-json", wrap("--arch-kwargs '{hidden: 1}'"), 2, "is not valid JSON", CKPT),
    Case("wrap/arch-kwargs-not-an-object", wrap("--arch-kwargs '[1]'"), 2, "must be a JSON object", CKPT),
    Case("wrap/arch-kwargs-unknown-argument", wrap("--arch-kwargs '{\"nope\": 1}'"), 1, "Check --arch-kwargs", CKPT),
    Case("wrap/arch-kwargs-wrong-sizes", wrap("--arch-kwargs '{\"hidden\": 32}'"), 1, "shapes do not fit", CKPT),
    Case("wrap/include-missing", wrap("--include nope.py"), 2, "--include nope.py does not exist", CKPT),
    Case("wrap/include-without-arch", "wrap model.pth --name digits-x --include model.py --input-shape -1,64", 2,
         "need --arch FILE.py:CLASS", CKPT),
    Case("wrap/labels-count-not-the-outputs", wrap("--labels nine.txt"), 1, "write one label per line, one for each score",
         (*CKPT, nine_labels)),
    Case("wrap/preprocess-raises", wrap("--preprocess steps.py:prepare --example raw.json"), 1,
         "steps.py:prepare failed on the --example: ValueError: pixels are 0-16; fix the function", (*CKPT, raising_preprocess)),
    Case("wrap/preprocess-without-raw-example", wrap("--preprocess steps.py:prepare"), 2, "needs --example FILE.json",
         (*CKPT, raising_preprocess)),
    Case("wrap/include-syntax-error", wrap("--include broken.py"), 1, "broken.py is not valid Python", (*CKPT, broken_arch)),
    Case("wrap/local-import-not-included", "wrap net.pth --name digits-x --arch net.py:Net --input-shape -1,64", 1,
         "add them: --include", (net_importing_a_sibling,)),
    Case("wrap/keys-that-do-not-match", wrap(file="renamed.pth"), 1, "missing from the checkpoint: layers.2.weight",
         (*CKPT, renamed_keys)),
    Case("wrap/state-dict-key-unknown", wrap("--state-dict-key nope"), 2, "it holds: layers.0.weight", CKPT),
    Case("wrap/strip-prefix-not-on-every-key", wrap("--strip-prefix nope."), 2, "not every key starts with it", CKPT),
    # --- wrap: the input schema -------------------------------------------------------------------------
    Case("wrap/input-shape-not-integers", wrap("--input-shape a,b"), 2, "write the dimensions as integers", CKPT),
    Case("wrap/input-shape-zero", wrap("--input-shape -1,0"), 2, "positive integers or -1", CKPT),
    Case("wrap/input-shape-that-does-not-fit", wrap("--input-shape -1,63"), 1, "failed on the example input", CKPT),
    Case("wrap/input-dtype-unknown", wrap("--input-dtype complex"), 2, "choose one of float16", CKPT),
    Case("wrap/input-dtype-without-shape", "wrap model.pth --name digits-x --arch model.py:DigitsMLP --input-dtype int64", 2,
         "--input-dtype needs --input-shape", CKPT),
    Case("wrap/input-dtypes-and-shapes-disagree", wrap("--input-shape -1,3 --input-dtype int64 --input-dtype int8 --input-dtype bool"),
         2, "give one dtype, or one each", CKPT),
    Case("wrap/example-missing", wrap("--example nope.npy"), 2, "--example nope.npy does not exist", CKPT),
    Case("wrap/example-not-a-tensor-file", wrap("--example model.py"), 2, "use .npy or a .pt of tensors", CKPT),
    Case("wrap/example-npy-of-objects", wrap("--example objects.npy"), 2, "use .npy or a .pt of tensors", (*CKPT, npy_of_objects)),
    Case("wrap/example-pt-of-a-dict", wrap("--example dict.pt"), 2, "a tensor or a tuple of tensors", (*CKPT, pt_of_a_dict)),
    Case("wrap/input-shape-for-a-program", "wrap fake.onnx --name digits-x --input-shape -1,64", 2, "drop --input-shape",
         (fake_onnx,)),
    # --- wrap: where the wheel goes ---------------------------------------------------------------------
    Case("wrap/out-is-a-file", wrap("--out model.py"), 1, "choose another --out", CKPT),
    Case("wrap/out-under-a-file", wrap("--out model.py/dist"), 1, "choose another --out", CKPT),
    Case("wrap/source-dir-not-empty", wrap("--source-dir folder"), 1, "give a new or empty directory", (*CKPT, folder)),
    Case("wrap/source-dir-a-file", wrap("--source-dir model.py"), 1, "give a new or empty directory", CKPT),
    Case("wrap/to-onnx-from-a-program", "wrap fake.onnx --name digits-x --to onnx", 2, "drop --to", (fake_onnx,)),
    Case("wrap/same-name-other-content", wrap("--out dist"), 1, "pass --overwrite to replace it", (*CKPT, other_wheel_in_dist)),
    Case("wrap/max-file-size-not-a-size", wrap("--max-file-size lots"), 2, "give e.g. 100MB", CKPT),
    # --- inspect, verify, list --------------------------------------------------------------------------
    Case("inspect/wheel-missing", "inspect nope-0.1.0-py3-none-any.whl", 1, "does not exist"),
    Case("inspect/wheel-not-a-zip", "inspect {wheel}", 1, "not a valid wheel", (wheel_of_noise,)),
    Case("inspect/wheel-without-manifest", "inspect {wheel}", 1, "no nnwheel.json inside", (plain_wheel,)),
    Case("inspect/wheel-manifest-corrupt", "inspect {wheel}", 1, "wrap the model again, or fetch the wheel again",
         (wheel_with_corrupt_manifest,)),
    Case("inspect/model-not-installed", "inspect no-such-model", 1, "pip install no-such-model here first"),
    Case("inspect/installed-manifest-corrupt", "inspect digits-mlp", 1, "pip install --force-reinstall digits-mlp",
         (*INSTALLED, installed_manifest_cut), "installed"),
    Case("verify/model-not-installed", "verify no-such-model", 1, "pip install no-such-model here first"),
    Case("verify/weights-changed", "verify digits-mlp", 1, "pip install --force-reinstall digits-mlp",
         (*INSTALLED, installed_weights_changed), "installed"),
    Case("verify/weights-missing", "verify digits-mlp", 1, "pip install --force-reinstall digits-mlp",
         (*INSTALLED, installed_weights_removed), "installed"),
    # --- index ------------------------------------------------------------------------------------------
    Case("index/dir-is-a-file", "index start --dir model.py", 1, "give the index another directory with --dir", CKPT),
    Case("index/status-of-a-file", "index status --dir model.py", 1, "give the index another directory with --dir", CKPT),
    Case("index/url-of-none-running", "index url --dir idx", 1, "start one with `nnwheel index start`"),
    Case("index/port-in-use", "index start --dir idx --port {busy} --insecure-fast-hashing", 1, "pass another --port"),
    Case("index/index-json-corrupt", "index start --dir idx --insecure-fast-hashing", 1, "fix or delete it", (corrupt_index_json,)),
    Case("index/user-devpi-cannot-take", "index start --dir idx --user 'two words'", 2, "e.g. ml-team"),
    Case("index/replica-of-not-http", "index start --dir idx --replica-of ftp://host/u/i/", 2, "give an http:// or https:// URL"),
    Case("index/replica-of-not-an-index", "index start --dir idx --replica-of {closed}", 2, "as `nnwheel index url` prints it"),
    Case("index/replica-without-secret", "index start --dir idx --replica-of {closed}nnwheel/models/", 2, "pass --secret-file"),
    Case("index/token-of-none-running", "index token list --dir idx", 1, "start one with `nnwheel index start`"),
    Case("index/tls-cert-without-key", "index start --dir idx --tls-cert model.py", 2, "give the certificate and its private key",
         CKPT),
    # --- publish ----------------------------------------------------------------------------------------
    Case("publish/no-index-running", "publish {wheel}", 1, "start one with `nnwheel index start`", (the_digits_wheel,)),
    Case("publish/wheel-missing", "publish nope-0.1.0-py3-none-any.whl --index {index}", 2, "does not exist"),
    Case("publish/a-directory", "publish folder --index {index}", 2, "nnwheel publish dist/*.whl", (folder,)),
    Case("publish/not-a-wheel-name", "publish model.py --index {index}", 2, "model wheels made by `nnwheel wrap`", CKPT),
    Case("publish/not-a-model-wheel", "publish {wheel} --index {index}", 2, "build it with `nnwheel wrap`", (plain_wheel,)),
    Case("publish/damaged-wheel", "publish {wheel} --index {index}", 1, "publish the new wheel", (wheel_with_changed_weights,)),
    Case("publish/index-not-http", "publish {wheel} --index ftp://host/", 2, "give an http:// or https:// URL", (the_digits_wheel,)),
    Case("publish/index-with-credentials", "publish {wheel} --index http://me:secret@127.0.0.1/", 2, "pass --user",
         (the_digits_wheel,)),
    Case("publish/unknown-repository", "publish {wheel} --index nosuchrepo", 2, "pass the index URL instead", (the_digits_wheel,)),
    Case("publish/pypirc-malformed", "publish {wheel} --index pypi", 2, "fix", (the_digits_wheel, malformed_pypirc)),
    Case("publish/index-unreachable", "publish {wheel} --index {closed}", 1, "that the server runs", (the_digits_wheel,)),
    Case("publish/wrong-password", "publish {wheel} --index {index} --user {user} --password wrong", 1, "password",
         (the_digits_wheel,)),
    Case("publish/released-with-other-content", "publish tiny_released-0.1.0-py2.py3-none-any.whl --index {index}", 1,
         "wrap again with a new --version", (other_content_of_a_released_wheel,)),
    Case("publish/cert-missing", "publish {wheel} --index {index} --cert nope.pem", 2, "give the CA's PEM file", (the_digits_wheel,)),
    Case("publish/cert-not-pem", "publish {wheel} --index {index} --cert model.py", 2, "give the CA's PEM file",
         (the_digits_wheel, checkpoint)),
    # --- deploy -----------------------------------------------------------------------------------------
    Case("deploy/index-not-http", "deploy digits-mlp --index ftp://host/simple/", 2, "give an http:// or https:// URL"),
    Case("deploy/index-with-credentials", "deploy digits-mlp --index http://me:secret@host/simple/", 2,
         "give pip a netrc at build time"),
    Case("deploy/image-not-a-reference", "deploy digits-mlp --index {simple} --image 'Not An Image'", 2, "NAME[:TAG][@DIGEST]"),
    Case("deploy/version-not-pep440", "deploy digits-mlp --index {simple} --version 'one two'", 2, "give e.g. 0.1.0"),
    Case("deploy/model-not-on-the-index", "deploy no-such-model --index {simple}", 1, "publish it first (nnwheel publish)"),
    Case("deploy/index-unreachable", "deploy digits-mlp --index {closed}", 1, "check --index or pass --version"),
    Case("deploy/out-is-a-file", "deploy digits-mlp --index {simple} --version 0.1.0 --out model.py", 1, "choose another --out", CKPT),
    # --- serve ------------------------------------------------------------------------------------------
    Case("serve/model-not-installed", "serve no-such-model", 1, "pip install no-such-model here first"),
    Case("serve/no-workers", "serve digits-mlp --workers 0", 2, "--workers and --max-batch are at least 1"),
    Case("serve/body-limit-zero", "serve digits-mlp --max-body-mb 0", 2, "--max-body-mb above 0"),
    Case("serve/port-in-use", "serve digits-mlp --port {busy}", 1, "pass another --port", INSTALLED, "installed"),
    Case("serve/grpc-port-in-use", "serve digits-mlp --grpc-port {busy}", 1, "pass another --grpc-port", INSTALLED, "installed"),
    Case("serve/weights-missing", "serve digits-mlp", 1, "pip install --force-reinstall digits-mlp",
         (*INSTALLED, installed_weights_removed), "installed"),
    # --- argparse's own refusals ------------------------------------------------------------------------
    Case("usage/wrap-without-name", "wrap model.pth", 2, "the following arguments are required: --name", CKPT, "usage"),
    Case("usage/wrap-to-unknown", wrap("--to tflite"), 2, "invalid choice: 'tflite'", CKPT, "usage"),
    Case("usage/serve-port-out-of-range", "serve digits-mlp --port 70000", 2, "give a number from 1 to 65535", (), "usage"),
    Case("usage/index-port-zero", "index start --dir idx --port 0", 2, "give a number from 1 to 65535", (), "usage"),
    # --- the generated package's command line -----------------------------------------------------------
    Case("package/input-missing", "predict --input nope.json", 1, "No such file or directory: 'nope.json'", INSTALLED, "package"),
    Case("package/input-not-json", "predict --input model.py", 1, "give JSON nested lists or a .npy array", (*INSTALLED, *CKPT),
         "package"),
    Case("package/input-npy-of-objects", "predict --input objects.npy", 1, "give JSON nested lists or a .npy array",
         (*INSTALLED, npy_of_objects), "package"),
    Case("package/input-wrong-shape", "predict --input short.json", 1, "expected (any, 64)", (*INSTALLED, short_rows), "package"),
    Case("package/input-strings", "predict --input strings.json", 1, "hold numbers", (*INSTALLED, string_rows), "package"),
    Case("package/inputs-too-many", "predict --input rows.json --input rows.json", 1, "takes 1 input(s) (input), got 2",
         (*INSTALLED, rows), "package"),
    Case("package/output-in-a-missing-directory", "predict --input rows.json --output nope/out.json", 1, "No such file or directory",
         (*INSTALLED, rows), "package"),
    Case("package/device-unknown", "predict --input rows.json --device nonsense", 1, "use device='cpu'", (*INSTALLED, rows),
         "package"),
    Case("package/device-absent", "predict --input rows.json --device cuda:7", 1, "use device='cpu'", (*INSTALLED, rows), "package"),
    Case("package/weights-cut-short", "predict --input rows.json", 1, "the install is incomplete",
         (*INSTALLED, rows, installed_weights_cut), "package"),
    Case("package/verify-weights-changed", "verify", 1, "reinstall with pip install --force-reinstall digits-mlp",
         (*INSTALLED, installed_weights_changed), "package"),
    # --- the generated package's Python API -------------------------------------------------------------
    Case("api/predict-float64", "import numpy, digits_mlp; digits_mlp.predict(numpy.zeros((2, 64)))", 1, "x.astype('float32')",
         INSTALLED, "api", "ValueError"),
    Case("api/predict-wrong-shape", "import digits_mlp; digits_mlp.predict([[0.5] * 63])", 1, "expected (any, 64)",
         INSTALLED, "api", "ValueError"),
    Case("api/predict-nothing", "import digits_mlp; digits_mlp.predict()", 1, "takes 1 input(s) (input), got 0",
         INSTALLED, "api", "ValueError"),
    Case("api/predict-ragged", "import digits_mlp; digits_mlp.predict([[0.5] * 64, [0.5]])", 1, "must be rectangular",
         INSTALLED, "api", "ValueError"),
    Case("api/predict-text", "import digits_mlp; digits_mlp.predict(['a text'])", 1, "not text; this model takes arrays",
         INSTALLED, "api", "ValueError"),
    Case("api/load-on-an-unknown-device", "import digits_mlp; digits_mlp.load('nonsense')", 1, "use device='cpu'",
         INSTALLED, "api", "ValueError"),
    Case("api/load-weights-cut-short", "import digits_mlp; digits_mlp.load()", 1, "reinstall with pip install --force-reinstall",
         (*INSTALLED, installed_weights_cut), "api", "digits_mlp.IntegrityError"),
    Case("api/verify-weights-changed", "import digits_mlp; digits_mlp.verify()", 1, "reinstall with pip install --force-reinstall",
         (*INSTALLED, installed_weights_changed), "api", "digits_mlp.IntegrityError"),
]  # fmt: skip


@pytest.fixture(scope="module")
def shared(tmp_path_factory, digits_wheel, devpi) -> Iterator[Shared]:
    root = tmp_path_factory.mktemp("bad-inputs")
    installed = root / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target",
                    installed, digits_wheel], check=True, capture_output=True)  # fmt: skip
    index = devpi.create_index()
    released = tiny_model_wheel(root, name="tiny-released", answer=1)
    env = {"NNWHEEL_INDEX_PASSWORD": index.password}
    subprocess.run([sys.executable, "-m", "nnwheel", "publish", released, "--index", index.url, "--user", index.user],
                   check=True, capture_output=True, env={**os.environ, **env})  # fmt: skip
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield Shared(digits_wheel, installed, index, busy.getsockname()[1], f"http://127.0.0.1:{free_port()}/")


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_bad_input_is_one_error_line_and_changes_nothing(case: Case, shared: Shared, tmp_path, capfd, monkeypatch):
    world = World(tmp_path / "work", tmp_path / "home", shared)
    world.dir.mkdir()
    world.home.mkdir()
    for lay_out in case.given:
        lay_out(world)
    argv = case.argv if case.runner == "api" else world.filled(case.argv)
    env = {"HOME": str(world.home), "NNWHEEL_INDEX_DIR": str(world.dir / "index"), "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": str(world.dir / "site"), MARKER: f"{os.getpid()}-{case.id}"}  # fmt: skip
    before, processes = tree(world.dir), descendants()
    code, stderr = run(case, argv, world, env, capfd, monkeypatch)
    assert code == case.code, stderr
    check_error(case, stderr)
    after = tree(world.dir)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"the command changed its directory: {changed}"
    left = (descendants() - processes) | processes_marked(f"{MARKER}={env[MARKER]}")
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "processes left running"


def run(case: Case, argv: str, world: World, env: dict[str, str], capfd, monkeypatch) -> tuple[int, str]:
    if case.runner in ("nnwheel", "usage"):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(world.dir)
        monkeypatch.setattr(sys, "dont_write_bytecode", True)
        try:
            code = main(shlex.split(argv))
        except SystemExit as exit:  # argparse
            code = exit.code
        return code, capfd.readouterr().err
    command = {
        "installed": [sys.executable, "-m", "nnwheel", *shlex.split(argv)],
        "package": [sys.executable, "-m", "digits_mlp", *shlex.split(argv)],
        "api": [sys.executable, "-c", argv],
    }[case.runner]
    result = subprocess.run(
        command, cwd=world.dir, env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False
    )
    return result.returncode, result.stderr


def check_error(case: Case, stderr: str) -> None:
    lines = stderr.strip().splitlines()
    if case.runner == "api":  # a Python exception, with its traceback: the class and what to do
        assert lines[-1].startswith(f"{case.raises}: ") and case.says in lines[-1], stderr
        return
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], stderr
    if case.runner == "usage":
        assert lines[0].startswith("usage: "), stderr
    else:
        assert errors[0].startswith("error: "), stderr
        # Before it: notes, warnings, what starts (devpi-server), a server's log (uvicorn's INFO), twine's progress.
        before = ("note: ", "warning: ", "starting ", "INFO: ", "Uploading ")
        assert all(line.startswith(before) for line in lines[:-1]), stderr
    assert case.says in errors[0], errors[0]


def tree(root: Path) -> dict[str, tuple]:
    """Every file, directory and link under root: its mode, and for files and links their size, time and hash."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if path.is_dir() and not path.is_symlink():  # its mtime moves with a temporary file made and removed in it
            found[str(path.relative_to(root))] = (info.st_mode,)
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else None
        found[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns, digest)
    return found


def descendants() -> set[int]:
    """The live processes below this one (forked trial children, servers started by the command)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def processes_marked(marker: str) -> set[int]:
    """Processes whose environment carries the case's marker: what a new process started, even once detached."""
    found = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes().split(b"\0") and int(environ.parent.name) != os.getpid():
                found.add(int(environ.parent.name))
        except OSError:
            continue
    return found


def test_every_case_has_its_own_id_and_the_table_covers_every_command():
    ids = [case.id for case in CASES]
    assert len(set(ids)) == len(ids) >= 60
    covered = {case.id.split("/")[0] for case in CASES}
    assert covered >= {"wrap", "inspect", "verify", "index", "publish", "deploy", "serve", "usage", "package", "api"}


def test_list_names_a_model_whose_entry_point_is_not_named_after_its_distribution(tmp_path):
    """Another package may declare a model of another name: nnwheel list shows it with its distribution's version."""
    dist_info = tmp_path / "other_models-2.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: other-models\nVersion: 2.0\n")
    (dist_info / "entry_points.txt").write_text("[nnwheel.models]\nfancy-model = fancy_model\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "nnwheel", "list"], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "fancy-model  2.0  (import fancy_model)" in result.stdout.splitlines()


# wrap in a new process, where another process truncates the checkpoint while a window of it is mapped and
# before it is read: without the lease that filemap takes, reading the window would end wrap with SIGBUS.
CUT_WHILE_MAPPED = """
import subprocess, sys, time
from pathlib import Path
import nnwheel.filemap as filemap

filemap.WINDOW_BYTES = 1 << 16  # many windows, so that one comes after the truncation
original, cutters = filemap.mapped_chunks, []

def cut_while_mapped(path, offset=0, size=None):
    for chunk in original(path, offset, size):
        if not cutters:
            cutters.append(subprocess.Popen([sys.executable, "-c", f"import os; os.truncate({str(path)!r}, 4096)"]))
            inode = f":{path.stat().st_ino} "  # until the truncation waits for the lease, or (without one) is done
            while cutters[0].poll() is None and not any(
                inode in line and "BREAKING" in line for line in Path("/proc/locks").read_text().splitlines()
            ):
                time.sleep(0.01)
        yield chunk

filemap.mapped_chunks = cut_while_mapped
from nnwheel.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_checkpoint_truncated_under_a_mapped_window_is_one_error_line_not_sigbus(tmp_path):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "wide.py").write_text(
        "import torch\n\nclass Wide(torch.nn.Linear):\n    def __init__(self):\n        super().__init__(1024, 1024)\n"
    )
    save_file(torch.nn.Linear(1024, 1024).state_dict(), tmp_path / "wide.safetensors")  # 4 MiB: 64 windows
    skip_without_leases(tmp_path / "wide.safetensors")
    command = [sys.executable, "-c", CUT_WHILE_MAPPED, "wrap", "wide.safetensors", "--name", "wide", "--arch",
               "wide.py:Wide", "--input-shape", "-1,1024", "--out", "dist"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1, f"exit {result.returncode}: {result.stderr}"  # SIGBUS: -7
    assert result.stderr.strip().splitlines() == [
        "error: wide.safetensors is being written while it is read; wrap it again once it is saved"
    ]
    assert not (tmp_path / "dist").exists()
    deadline = time.monotonic() + 30
    while (tmp_path / "wide.safetensors").stat().st_size != 4096:  # the truncation goes ahead once wrap lets go
        assert time.monotonic() < deadline, "the truncation never went ahead"
        time.sleep(0.05)
