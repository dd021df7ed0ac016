"""Streamed .npz archives in ADM's layout: an image array written one batch at a time (50000 images of 512x512
are 39 GB, never held at once), then small arrays (labels, statistics) beside it. np.load and ADM's evaluator
read the result as any .npz. The archive is written beside its name and renamed into place once complete: an
interrupted write leaves no half archive under the name."""
from __future__ import annotations

import os
import zipfile

import numpy as np


class NpzStreamWriter:
    """`with NpzStreamWriter(path) as w: w.begin("arr_0", (N, H, W, 3)); w.write(batch) ...; w.add("arr_1", labels)`.

    The streamed array's length is fixed up front (its .npy header comes first); writing more or fewer rows than
    declared is an error naming the array."""

    def __init__(self, path: str):
        self.path, self.zip, self.stream, self.key = path, None, None, None
        self.tmp = f"{path}.partial"
        self.rows = self.expected = 0
        self.row_shape: tuple[int, ...] = ()

    def __enter__(self) -> "NpzStreamWriter":
        self.zip = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        return self

    def begin(self, key: str, shape: tuple[int, ...], dtype=np.uint8) -> None:
        self._finish()
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
        self.stream = self.zip.open(f"{key}.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_1_0(self.stream, header)
        self.key, self.rows, self.expected, self.row_shape, self.dtype = key, 0, shape[0], tuple(shape[1:]), dtype

    def write(self, rows: np.ndarray) -> None:
        """Append rows (B, *shape[1:]) to the array begun last."""
        if tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"{self.path}: {self.key} rows are {self.row_shape}, got {tuple(rows.shape[1:])}")
        if self.rows + len(rows) > self.expected:
            raise ValueError(f"{self.path}: more than the {self.expected} rows declared for {self.key}")
        self.stream.write(np.ascontiguousarray(rows, self.dtype).tobytes())
        self.rows += len(rows)

    def add(self, key: str, array) -> None:
        """A whole small array."""
        self._finish()
        with self.zip.open(f"{key}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asarray(array))

    def _finish(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
            if self.rows != self.expected:
                raise ValueError(f"{self.path}: {self.key} got {self.rows} of the {self.expected} rows declared")

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            if self.stream is not None:
                self.stream.close()
            self.zip.close()
            complete = exc_type is None and self.rows == self.expected
            os.replace(self.tmp, self.path) if complete else os.remove(self.tmp)
