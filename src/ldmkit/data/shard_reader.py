"""Reading webdataset tar shards so that no failure goes uncounted and no failure loops forever.

`tar_samples` replaces ``webdataset.tarfile_to_samples``: same samples (``{"__key__", "__url__",
ext: bytes}``), but a shard that ends without the tar end-of-archive block is reported as
`TruncatedShardError`. Python's `tarfile` (which webdataset uses) treats a file cut inside a
member header, or exactly between two members, as a normal end of the archive, so such a shard
would silently lose every sample after the cut. Every complete tar ends with zero blocks (POSIX
ustar; Python's `tarfile`, GNU tar and webdataset's `TarWriter` all write them), so their absence
means the file was cut.

`ShardErrors` counts each failed shard read once (``shard_error``) and, for resampled streams,
stops with a clear error when every shard is unreadable (or every sample in them is skipped):
they would otherwise be drawn again and again forever.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn

from webdataset.tariterators import group_by_keys, url_opener

from ldmkit.data.skips import SkipCounter

# A resampled stream stops when nothing can be read from any shard, or nothing usable (see ShardErrors).
MIN_FAILED_READS = 20
MIN_SKIPPED_SAMPLES = 5000  # with no usable sample at all yet (a filter passing 1% would fail 1 in 1e21)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped like webdataset does


class TruncatedShardError(tarfile.ReadError):
    """A tar shard that ends before its end-of-archive block (cut in a header or between members)."""


class _EndTrackingTarInfo(tarfile.TarInfo):
    """Records on the TarFile why header reading stopped (EOFHeaderError: the end-of-archive block)."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as error:
            tar.ldmkit_end = error  # type: ignore[attr-defined]
            raise


def _end_problem(tar: tarfile.TarFile, members: int) -> str | None:
    end = getattr(tar, "ldmkit_end", None)
    if isinstance(end, tarfile.EOFHeaderError):
        return None
    where = f"after {members} member(s), at byte {tar.offset}"
    if isinstance(end, tarfile.TruncatedHeaderError):
        return f"the file ends inside a tar header {where}: it is truncated"
    if isinstance(end, tarfile.EmptyHeaderError):
        return f"the file ends without the tar end-of-archive block {where}: it is truncated"
    return f"no valid tar header {where} ({end}): the file is truncated or damaged"


def tar_members(stream: Any, url: str) -> Iterator[dict[str, Any]]:
    """{"fname", "data", "__url__"} for each regular file of a tar stream; raises on a cut file."""
    count = 0
    tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndTrackingTarInfo)
    for info in tar:
        if not info.isreg() or _META.match(info.name):
            continue
        data = tar.extractfile(info).read()
        count += 1
        yield {"fname": info.name, "data": data, "__url__": url}
        tar.members = []  # stream mode keeps every TarInfo otherwise
    problem = _end_problem(tar, count)
    if problem is not None:
        raise TruncatedShardError(f"{problem} ({url})")


def _expand(sources: Iterable[dict[str, Any]], handler: Callable[[BaseException], bool]) -> Iterator[dict[str, Any]]:
    for source in sources:
        stream = source["stream"]
        try:
            for member in tar_members(stream, source["url"]):
                source["members"] = source.get("members", 0) + 1  # seen by ShardErrors.track
                yield member
        except Exception as error:  # noqa: BLE001 - any read failure is one shard error
            if not handler(error):
                raise
        finally:
            try:
                stream.close()
            except Exception as error:  # noqa: BLE001 - e.g. a pipe: url whose command failed
                handler(error)
        yield {}  # end of shard: group_by_keys never merges samples across shards


def tar_samples(shards: Iterable[dict[str, Any]], handler: Callable[[BaseException], bool]) -> Iterator[dict[str, Any]]:
    """Shard dicts {"url": ...} -> grouped raw samples, like webdataset.tarfile_to_samples."""
    return group_by_keys(_expand(url_opener(shards, handler=handler), handler), handler=handler)


class ShardErrors:
    """Counts a shard read that failed (open error, truncated or garbage tar) once, however many
    exceptions the nested readers report for it, under the shard's url.

    With `urls` given (resampled streams, which would otherwise draw failing shards forever) it
    raises when (a) the last `MIN_FAILED_READS` or more shard reads in a row, covering every url,
    read no member at all, or (b) `MIN_SKIPPED_SAMPLES` samples were skipped, every url was
    drawn, and not one usable sample came out in this pass. Each rule only fires when no shard
    can help, so bad shards among good ones never stop training.
    """

    def __init__(self, skips: SkipCounter, urls: Iterable[str] | None = None, source: str = "webdataset") -> None:
        self.skips, self.url, self.error = skips, "?", None
        self.urls = None if urls is None else set(urls)
        self.source = source
        self.first_error: BaseException | None = None
        self.current: dict[str, Any] | None = None
        self.drawn: set[str] = set()
        self.empty_reads, self.empty_urls = 0, set()
        self.any_good = False
        self.skipped_before = skips.dropped_here(exclude=("shard_error",))  # counts go on across epochs

    def track(self, shards: Iterable[dict]) -> Iterator[dict]:
        for shard in shards:
            self.flush()  # the previous shard is finished when the next one is asked for
            self._after_read()
            self.url, self.current = shard["url"], shard
            self.drawn.add(self.url)
            yield shard
        self.flush()

    def handler(self, error: BaseException) -> bool:
        self.error = self.error or error
        self.first_error = self.first_error or error
        return True  # handled: go on with the next member / shard

    def flush(self) -> None:
        if self.error is not None:
            self.skips.add("shard_error", self.url, self.error)
            self.error = None

    def watch(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pass decoded samples through, noting that the stream makes progress."""
        for sample in samples:
            self.any_good = True
            yield sample

    def _skipped_samples(self) -> int:
        return self.skips.dropped_here(exclude=("shard_error",)) - self.skipped_before

    def _after_read(self) -> None:
        if self.current is None:
            return
        if self.urls is not None and not self.any_good and self.urls <= self.drawn:
            skipped = self._skipped_samples()  # counted by this worker's decoder
            if skipped >= MIN_SKIPPED_SAMPLES:
                self._stop(f"{skipped} samples read from the {len(self.urls)} shard(s) were skipped, none used")
        if self.current.get("members", 0):
            self.empty_reads, self.empty_urls = 0, set()
            return
        self.empty_reads += 1
        self.empty_urls.add(self.current["url"])
        if self.urls is not None and self.empty_reads >= MIN_FAILED_READS and self.urls <= self.empty_urls:
            self._stop(f"the last {self.empty_reads} shard reads, covering all {len(self.urls)} shard(s), read nothing")

    def _stop(self, what: str) -> NoReturn:
        raise RuntimeError(
            f"{self.source}: {what}: no usable sample (skipped so far: {self.skips}; first shard error: "
            f"{self.first_error}). Check that the shards are readable tar files with captioned images "
            "(e.g. `tar tvf SHARD`), the data.min_size / data.max_aspect_ratio filters and data.missing_caption."
        )
