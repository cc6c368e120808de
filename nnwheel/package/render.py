"""template/ filled in: the package's code, pyproject.toml, the manifest and the model card."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from string import Template

from ..manifest import MANIFEST_NAME, Manifest

# In the source tree template/ sits beside nnwheel/; in an installed nnwheel it is packaged as nnwheel/template.
_NNWHEEL = Path(__file__).resolve().parent.parent
TEMPLATE_DIR = next(p for p in (_NNWHEEL / "template", _NNWHEEL.parent / "template") if p.is_dir())

# Files of template/package/ every model package gets, and the runtime module chosen by the manifest.
_PACKAGE_FILES = ("__init__.py", "__main__.py", "_schema.py", "batch.py")
# What a runtime module imports besides: the loader of weight parts, for the runtimes whose weights can be split.
_RUNTIME_FILES = {"torch": ("_parts.py",), "transformers": ("_parts.py",)}


@dataclass(frozen=True)
class ProjectMetadata:
    summary: str
    requirements: tuple[str, ...]
    model_card: str | None = None  # the user's Markdown; the generated card is appended
    license: str | None = None  # SPDX expression
    author: str | None = None


def package_code(runtime: str, processing: bool = False) -> list[tuple[str, Path]]:
    """The template's code every model package gets, with the runtime module it needs, and where predict() does
    more than run the model (--preprocess, --labels, --postprocess), what does it: (name, template file)."""
    source = TEMPLATE_DIR / "package"
    names = [*_PACKAGE_FILES, *_RUNTIME_FILES.get(runtime, ()), *(["_processing.py"] if processing else [])]
    return [(name, source / name) for name in names] + [("_runtime.py", source / f"_runtime_{runtime}.py")]


def write_manifest(package: Path, manifest: Manifest) -> None:
    (package / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")


def part_files(model: str, name: str) -> list[tuple[str, bytes]]:
    """A weights part's package code and README.md: (name, bytes). Its pyproject.toml waits for its version."""
    readme = Template((TEMPLATE_DIR / "part" / "README.md").read_text(encoding="utf-8")).substitute(model=model, name=name)
    return [("__init__.py", (TEMPLATE_DIR / "part" / "__init__.py").read_bytes()), ("README.md", readme.encode())]


def part_pyproject_text(model: str, name: str, version: str, import_name: str) -> str:
    return Template((TEMPLATE_DIR / "part" / "pyproject.toml").read_text(encoding="utf-8")).substitute(
        model=model,
        name=json.dumps(name),
        version=json.dumps(version),
        summary=json.dumps(f"Weights of {model}, split off by nnwheel; {model} requires it"),
        import_name=import_name,
    )


def write_model_card(project_dir: Path, manifest: Manifest, metadata: ProjectMetadata) -> None:
    """README.md: the model card, which becomes the wheel's description."""
    (project_dir / "README.md").write_text(model_card(manifest, metadata), encoding="utf-8")


def pyproject_text(name: str, version: str, import_name: str, metadata: ProjectMetadata) -> str:
    return Template((TEMPLATE_DIR / "pyproject.toml").read_text(encoding="utf-8")).substitute(
        name=json.dumps(name),
        version=json.dumps(version),
        summary=json.dumps(metadata.summary),
        dependencies=json.dumps(list(metadata.requirements)),
        optional_metadata=_optional_metadata(metadata),
        import_name=import_name,
    )


def _optional_metadata(metadata: ProjectMetadata) -> str:
    lines = []
    if metadata.license:
        lines.append(f"license = {json.dumps(metadata.license)}")
    if metadata.author:
        lines.append(f"authors = [{{ name = {json.dumps(metadata.author)} }}]")
    return "".join(line + "\n" for line in lines)


def model_card(manifest: Manifest, metadata: ProjectMetadata) -> str:
    generated = Template((TEMPLATE_DIR / "README.md").read_text(encoding="utf-8")).substitute(
        name=manifest.name,
        import_name=manifest.import_name,
        summary=metadata.summary,
        use=_use(manifest),
        format=manifest.format,
        runtime=manifest.runtime,
        weights_summary=", ".join(
            [f"`{w.path}` ({human_size(w.size)})" for w in manifest.weights]
            + [f"weights part `{p.distribution}=={p.version}` ({human_size(p.size)})" for p in manifest.parts]
        ),
        source_name=manifest.source.name,
        source_sha256=manifest.source.sha256,
        nnwheel_version=manifest.nnwheel_version,
        device_variable=f"{manifest.import_name.upper()}_DEVICE",
    )
    if metadata.model_card is None:
        return generated
    # The user's card first; the generated usage and schema follow as an appendix.
    appendix = generated.split("\n", 1)[1].replace("\n## ", "\n### ")
    return f"{metadata.model_card.rstrip()}\n\n## Packaged by nnwheel\n{appendix}"


def _use(manifest: Manifest) -> str:
    """The card's usage and its inputs and outputs: how this model's predict() is called (template/card/)."""
    card = TEMPLATE_DIR / "card" / f"{_called_as(manifest)}.md"
    last = manifest.outputs[-1]
    return Template(card.read_text(encoding="utf-8")).substitute(
        name=manifest.name,
        import_name=manifest.import_name,
        schema_table=_schema_table(manifest),
        labels=_listed(manifest.outputs[0].labels),
        size=last.shape[-1] if last.shape else "",
    ).rstrip("\n")


def _called_as(manifest: Manifest) -> str:
    """How predict() is called: with tensors, or, for a Hugging Face model, as its task takes text or images
    (which the schema tells, as the package's runtime reads it: images in; entities, a label or an embedding out)."""
    if manifest.runtime != "transformers":
        return "tensor"
    if manifest.inputs[0].kind == "image":
        return "image-classification"
    return {"label": "text-classification", "json": "token-classification"}.get(manifest.outputs[0].kind, "feature-extraction")


def _listed(labels: tuple[str, ...], shown: int = 20) -> str:
    """Labels in the card's prose; the first `shown` of a long list (ImageNet's thousand) and how many there are."""
    names = ", ".join(f"`{label}`" for label in labels[:shown])
    return names if len(labels) <= shown else f"{names}, ... ({len(labels)} in all)"


def _schema_table(manifest: Manifest) -> str:
    rows = ["| | name | dtype | shape |", "|---|---|---|---|"]
    for kind, specs in (("input", manifest.inputs), ("output", manifest.outputs)):
        for spec in specs:
            shape = "(" + ", ".join("any" if d == -1 else str(d) for d in spec.shape) + ")"
            rows.append(f"| {kind} | `{spec.name}` | {spec.dtype} | {shape} |")
    structure = {"tensor": "one array", "tuple": "a tuple", "dict": "a dict keyed by output name",
                 "json": "a JSON value (lists, dicts, strings, numbers)"}
    text = "\n".join(rows) + f"\n\npredict() returns {structure[manifest.output_structure]}."
    processing = manifest.processing
    if processing is None:
        return text
    takes = {"tensor": "the inputs above", "text": "a string or a list of strings", "json": "a JSON value"}
    gives = {"tensor": structure[manifest.output_structure], "label": "each sample's `label` and its `scores`",
             "json": "what its postprocess returns"}  # fmt: skip
    labels = f" The labels: {', '.join(f'`{label}`' for label in processing.labels)}." if processing.labels else ""
    return (
        "\n".join(rows) + f"\n\npredict() takes {takes[processing.input]} and returns {gives[processing.output]}; "
        f"predict_tensors() runs the model alone, on the inputs above, and returns {structure[manifest.output_structure]}.{labels}"
    )


def human_size(size: float) -> str:
    if size < 1000:
        return f"{size:.0f} B"
    for unit in ("KB", "MB", "GB"):
        size /= 1000
        if size < 1000:
            break
    return f"{size:.1f} {unit}"
