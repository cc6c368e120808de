"""Check inputs against the recorded schema and shape the outputs. Needs numpy only; torch tensors pass through.

A model is batched when every input's first dimension is free (-1). For such a model one sample without the
batch dimension is accepted too: it is run as a batch of one and the outputs come back without that dimension.
Text and images are checked as what they are, not as tensors: strings, and images of any sizes (_images).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence


class Prepared(NamedTuple):  # not a dataclass: importing dataclasses costs more than the rest of the package
    values: list[Any]  # numpy arrays or torch tensors, in the schema's order
    as_tensors: bool  # the caller passed tensors, so outputs stay tensors
    unbatched: bool  # a single sample was given: outputs drop the batch dimension


# What ready() asks of one input: (numpy dtype, rank, skip, dims), where skip is 1 when the model is batched
# (the batch dimension may have any size) and dims is the shape after it. A plain tuple, not a NamedTuple:
# ready() unpacks one per input on every call, and only an exact tuple unpacks at full speed.
Expected = tuple[Any, int, int, tuple[int, ...]]


def is_batched(specs: list[dict[str, Any]]) -> bool:
    return all(spec["shape"][:1] == [-1] for spec in specs)


def expectations(specs: list[dict[str, Any]], batched: bool) -> list[Expected] | None:
    """What ready() asks of each input, worked out once, by the first load(): it imports numpy. None when a
    dimension besides the batch is free or numpy lacks a dtype (bfloat16): prepare() checks all of those."""
    numpy = _np()
    skip = 1 if batched else 0
    expected = []
    for spec in specs:
        dims = tuple(spec["shape"][skip:])
        if -1 in dims or spec.get("kind") == "text":
            return None
        try:
            dtype = numpy.dtype(spec["dtype"])
        except TypeError:
            return None
        expected.append((dtype, len(spec["shape"]), skip, dims))
    return expected


def ready(values: list[Any], expected: list[Expected] | None) -> bool:
    """Whether every value is a numpy array of its input's dtype and full shape, which prepare() would pass on
    as it is: the common case, answered in a fraction of prepare()'s time. Nested lists become arrays first,
    in place and as prepare() makes them, so that a list is converted once whichever path runs."""
    if expected is None or len(values) != len(expected):
        return False
    i = 0  # an index, not enumerate(zip()): building those two costs as much as all the checks
    for dtype, rank, skip, dims in expected:
        value = values[i]
        if type(value) is not _numpy.ndarray:
            if type(value) is not list:
                return False
            try:
                value = values[i] = _numpy.asarray(value, dtype)
            except (ValueError, TypeError):
                return False  # prepare() tries again and says what is wrong
        # `is`: an equal dtype that is not numpy's own object (another byte order) is left to prepare()
        if value.dtype is not dtype or value.ndim != rank or value.shape[skip:] != dims:
            return False
        i += 1
    return True


def prepare(inputs: Sequence[Any], specs: list[dict[str, Any]], batched: bool) -> Prepared:
    """The inputs as the model takes them: nested lists and scalars become numpy arrays of their spec's dtype,
    a single sample gets the batch dimension. Raises ValueError naming the input that does not fit."""
    if len(inputs) != len(specs):
        names = ", ".join(spec["name"] for spec in specs)
        raise ValueError(f"predict() takes {len(specs)} input(s) ({names}), got {len(inputs)}")
    values, as_tensors, unbatched = [], False, None
    for value, spec in zip(inputs, specs):
        if spec.get("kind") == "text":
            value, single = _texts(value, spec)
        elif spec.get("kind") == "image":  # images of any sizes: the model's image processor resizes them
            value, single = _images(value, spec)
        else:
            if _is_tensor(value):
                as_tensors = True
            elif type(value) is not _np().ndarray:
                value = _to_array(value, spec)
            single = _check(value, spec, batched)
        if unbatched is not None and single != unbatched:
            raise ValueError("give every input with its batch dimension, or every input without it, not a mix")
        unbatched = single
        values.append(value)
    if unbatched:
        values = [value[None] for value in values]
    return Prepared(values, as_tensors, bool(unbatched))


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def _np() -> Any:
    global _numpy
    if _numpy is None:  # numpy is imported on the first predict(), not with the package
        import numpy

        _numpy = numpy
    return _numpy


_numpy: Any = None


def _to_array(value: Any, spec: dict[str, Any]) -> Any:
    np = _np()
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value, dtype=spec["dtype"])  # lists and scalars take the schema's dtype
    except (ValueError, TypeError) as error:
        if isinstance(value, str) or (isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)):
            wanted = "(" + ", ".join("any" if d == -1 else str(d) for d in spec["shape"]) + ")"
            raise ValueError(
                f"input {spec['name']!r} takes {spec['dtype']} numbers of shape {wanted}, not text; this model "
                "takes arrays or nested lists of numbers"
            ) from None
        raise ValueError(
            f"input {spec['name']!r} cannot become a {spec['dtype']} array ({error}); "
            "nested lists must be rectangular and hold numbers"
        ) from None


def _texts(value: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    """A text input as a numpy array of str: one string (a single sample, True) or a list of them (False)."""
    np = _np()
    texts = value.tolist() if isinstance(value, np.ndarray) and value.ndim == 1 else value
    if isinstance(texts, str):
        return np.asarray(texts, dtype=str), True
    if not isinstance(texts, (list, tuple)) or not all(isinstance(text, str) for text in texts):
        raise ValueError(f"input {spec['name']!r} takes a string or a list of strings, got {_described(value)}")
    return np.asarray(texts, dtype=str).reshape(-1), False


def _images(value: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    """An image input: one image (a single sample, True), or a batch (False): a list of images, each of its own
    size, or one (n, height, width, 3) array. An image is a uint8 RGB array (height, width, 3), nested lists of
    0-255 integers, or a PIL image, converted to RGB as transformers' image-classification pipeline converts it."""
    name = repr(spec["name"])
    if isinstance(value, (list, tuple)) and (not value or not isinstance(value[0], (list, tuple)) or _depth(value) == 4):
        return [_image(item, spec, f"{name}[{i}]", (3,)) for i, item in enumerate(value)], False
    image = _image(value, spec, name, (3, 4))
    return image, image.ndim == 3


def _depth(value: Any) -> int:
    """How deep nested lists go: 4 for a list of images as nested lists, 3 for one image."""
    depth = 0
    while isinstance(value, (list, tuple)) and value:
        value, depth = value[0], depth + 1
    return depth


def _image(value: Any, spec: dict[str, Any], name: str, ranks: tuple[int, ...]) -> Any:
    """One image (rank 3), or where `ranks` has 4, a batch of them, as the uint8 RGB array the processor takes.
    Floats are refused, not scaled: the processor would take [0, 1] floats for 0-255 values and divide them."""
    np = _np()
    if type(value).__module__.startswith("PIL."):
        value = np.asarray(value.convert("RGB"))
    elif type(value) is not np.ndarray:
        value = _pixels(value, name)
    channels = spec["shape"][-1]
    if value.ndim not in ranks or value.shape[-1] != channels:
        wanted = f"(height, width, {channels})" + (f" for one image, (n, height, width, {channels}) for a batch, or a "
                                                   "list of images of any sizes" if 4 in ranks else "")
        raise ValueError(f"input {name} has shape {tuple(value.shape)}, expected {wanted}{_channels_hint(value)}")
    if value.dtype != np.uint8:
        raise ValueError(
            f"input {name} has dtype {value.dtype}, expected uint8: pass RGB values 0-255, e.g. x.astype('uint8') for "
            "integers or (x * 255).round().astype('uint8') for floats in [0, 1], or PIL images"
        )
    return value


def _pixels(value: Any, name: str) -> Any:
    """Nested lists (or a torch tensor) as an array; integers 0-255 as uint8, anything else as it is, for _image to refuse."""
    np = _np()
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:
        raise ValueError(f"input {name} cannot become an image ({error}); an image's nested lists must be rectangular") from None
    if array.dtype.kind in "iu" and array.size:
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"input {name} has values from {array.min()} to {array.max()}; pass RGB values 0-255")
        return array.astype(np.uint8)
    return array


def _channels_hint(value: Any) -> str:
    if value.ndim == 2 or value.shape[-1:] == (1,):
        return "; a grayscale image: repeat it over 3 channels (numpy.stack([x] * 3, axis=-1) for a 2-D x), or pass it as a PIL image"
    if value.shape[-1:] == (4,):
        return "; an RGBA image: drop its alpha channel (x[..., :3]), or pass it as a PIL image"
    return "; pass RGB images with the channels last"


def _described(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(item).__name__ for item in value if not isinstance(item, str)})
        return f"a {type(value).__name__} holding {', '.join(kinds)}"
    return type(value).__name__


def _check(value: Any, spec: dict[str, Any], batched: bool) -> bool:
    """Raise ValueError unless the value fits the spec; return True for a sample without the batch dimension."""
    expected = spec["shape"]
    shape = value.shape
    if not _has_dtype(value, spec["dtype"]):
        dtype = str(value.dtype).removeprefix("torch.")
        raise ValueError(
            f"input {spec['name']!r} has dtype {dtype}, expected {spec['dtype']}; convert it first, "
            f"e.g. x.astype('{spec['dtype']}') or tensor.to(torch.{spec['dtype']})"
        )
    unbatched = batched and len(shape) == len(expected) - 1
    if not _fits(shape, expected[1:] if unbatched else expected):
        wanted = "(" + ", ".join("any" if e == -1 else str(e) for e in expected) + ")"
        raise ValueError(f"input {spec['name']!r} has shape {tuple(shape)}, expected {wanted}")
    return unbatched


def _fits(shape: tuple[int, ...], expected: list[int]) -> bool:
    if len(shape) != len(expected):
        return False
    for size, wanted in zip(shape, expected):
        if wanted != -1 and wanted != size:
            return False
    return True


def _has_dtype(value: Any, name: str) -> bool:
    # A numpy dtype compares with its name in a fraction of a microsecond; str(dtype) takes several.
    if _is_tensor(value):
        return str(value.dtype) == f"torch.{name}"
    return value.dtype == name


def converter(prepared: Prepared, to_numpy: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """How prepare()'s caller gets each output: as numpy unless it passed tensors, without the batch
    dimension when it passed a single sample."""
    as_given = _unchanged if prepared.as_tensors else to_numpy
    return (lambda output: as_given(output[0])) if prepared.unbatched else as_given


def _unchanged(output: Any) -> Any:
    return output


def finish(outputs: Any, convert: Callable[[Any], Any]) -> Any:
    """The outputs in the model's structure (one, a tuple or a dict), each through `convert`."""
    if isinstance(outputs, dict):
        return {name: convert(output) for name, output in outputs.items()}
    if isinstance(outputs, (tuple, list)):
        return tuple([convert(output) for output in outputs])
    return convert(outputs)
