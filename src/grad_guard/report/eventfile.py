"""Read one TensorBoard event file record by record, and say where reading stopped.

TensorBoard's own loader stops quietly at the first damaged record (it assumes the
file is still being written), so a file corrupted half-way looks like a shorter run.
This reader checks every record's framing and checksums (the TFRecord format: length,
masked CRC-32C of the length, data, masked CRC-32C of the data) and returns, with the
values, a :class:`FileRead` that says how many bytes and records were read and why it
stopped early, if it did.

Only what the report needs is decoded: scalar values (``simple_value`` or a one-element
float tensor) and text (string tensors, as ``SummaryWriter.add_text`` writes; its
``/text_summary`` tag suffix is dropped, so texts come back under the tag given to
``add_text``).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any

_HEADER = 12  # uint64 length + uint32 masked CRC of the length
_FOOTER = 4  # uint32 masked CRC of the data
_DT_STRING = 7  # tensorflow DataType enum
# torch's SummaryWriter.add_text(tag, ...) stores the text under "<tag>/text_summary"
TEXT_SUFFIX = "/text_summary"


@dataclass
class FileRead:
    """How much of one event file was read.

    Attributes:
        path: the file.
        size: its size in bytes.
        bytes_read: bytes of whole, valid records read from the start.
        records: valid records read.
        first_step / last_step: smallest and largest step of the records read.
        error: why reading stopped before the end of the file (``None``: read whole).
    """

    path: str
    size: int
    bytes_read: int = 0
    records: int = 0
    first_step: int | None = None
    last_step: int | None = None
    error: str | None = None

    @property
    def complete(self) -> bool:
        """Whether the whole file was read."""
        return self.error is None

    def describe(self) -> str:
        """One sentence about an incomplete read (``""`` for a complete one)."""
        if self.complete:
            return ""
        steps = (
            f"steps {self.first_step}-{self.last_step} read"
            if self.first_step is not None
            else "no step read"
        )
        return (
            f"{os.path.basename(self.path)}: reading stopped at byte {self.bytes_read} of "
            f"{self.size} after {self.records} record(s) ({steps}): {self.error}; "
            "the rest of the file is not in this report"
        )


@dataclass
class EventData:
    """The values of one file, in the order they were written.

    Attributes:
        scalars: ``(step, tag, value)``.
        texts: ``(step, tag, text)``.
        read: how much of the file was read.
    """

    scalars: list[tuple[int, str, float]] = field(default_factory=list)
    texts: list[tuple[int, str, str]] = field(default_factory=list)
    read: FileRead = field(default_factory=lambda: FileRead("", 0))


def _crc(data: bytes) -> int:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    return int(masked_crc32c(data))


def read_event_file(path: str) -> EventData:
    """Decode the scalars and texts of ``path`` up to its end or its first damaged record.

    Args:
        path: an ``events.out.tfevents.*`` file.

    Raises:
        OSError: if the file cannot be opened.

    Example:
        >>> import tempfile, glob
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> folder = tempfile.mkdtemp()
        >>> with SummaryWriter(folder) as writer:
        ...     writer.add_scalar("grad_norm/fc", 0.5, 3)
        >>> data = read_event_file(glob.glob(folder + "/events.out.tfevents.*")[0])
        >>> data.scalars, data.read.complete
        ([(3, 'grad_norm/fc', 0.5)], True)
    """
    from tensorboard.compat.proto import event_pb2

    data = EventData(read=FileRead(path, os.path.getsize(path)))
    read = data.read
    with open(path, "rb") as handle:
        while True:
            header = handle.read(_HEADER)
            if not header:
                return data
            error = _check_header(header)
            if error:
                read.error = error
                return data
            (length,) = struct.unpack("<Q", header[:8])
            body = handle.read(length + _FOOTER)
            if len(body) < length + _FOOTER:
                read.error = (
                    f"the file ends inside record {read.records + 1} "
                    "(cut off, or still being written)"
                )
                return data
            payload, footer = body[:length], body[length:]
            if struct.unpack("<I", footer)[0] != _crc(payload):
                read.error = f"record {read.records + 1} fails its checksum (corrupted data)"
                return data
            try:
                event = event_pb2.Event.FromString(payload)
            except Exception as err:  # protobuf's DecodeError; the checksum matched
                read.error = f"record {read.records + 1} is not a TensorBoard event ({err})"
                return data
            _collect(event, data)
            read.records += 1
            read.bytes_read += _HEADER + length + _FOOTER


def _check_header(header: bytes) -> str | None:
    if len(header) < _HEADER:
        return "the file ends inside a record header (cut off, or still being written)"
    if struct.unpack("<I", header[8:])[0] != _crc(header[:8]):
        return "a record length fails its checksum (corrupted data)"
    return None


def _collect(event: Any, data: EventData) -> None:
    step = int(event.step)
    read = data.read
    if event.HasField("summary"):
        read.first_step = step if read.first_step is None else min(read.first_step, step)
        read.last_step = step if read.last_step is None else max(read.last_step, step)
    for value in event.summary.value:
        kind = value.WhichOneof("value")
        if kind == "simple_value":
            data.scalars.append((step, value.tag, float(value.simple_value)))
        elif kind == "tensor":
            tensor = value.tensor
            if tensor.dtype == _DT_STRING and tensor.string_val:
                text = tensor.string_val[0].decode("utf-8", errors="replace")
                tag = value.tag.removesuffix(TEXT_SUFFIX)
                data.texts.append((step, tag, text))
            elif value.metadata.plugin_data.plugin_name in ("scalars", ""):
                number = _tensor_scalar(tensor)
                if number is not None:
                    data.scalars.append((step, value.tag, number))


def _tensor_scalar(tensor: Any) -> float | None:
    """The value of a one-element float tensor (new-style scalar summaries)."""
    for values in (tensor.float_val, tensor.double_val):
        if len(values) == 1:
            return float(values[0])
    content = tensor.tensor_content
    formats = {1: "<f", 2: "<d"}  # DT_FLOAT, DT_DOUBLE
    fmt = formats.get(tensor.dtype)
    if fmt and len(content) == struct.calcsize(fmt):
        return float(struct.unpack(fmt, content)[0])
    return None
