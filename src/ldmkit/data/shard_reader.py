"""Reading webdataset tar shards so that no failure goes uncounted and no failure loops forever.

`tar_samples` replaces ``webdataset.tarfile_to_samples``: same samples (``{"__key__", "__url__",
ext: bytes}``), but a shard that ends without the tar end-of-archive block is reported as
`TruncatedShardError`. Python's `tarfile` (which webdataset uses) treats a file cut inside a
member header, or exactly between two members, as a normal end of the archive, so such a shard
would silently lose every sample after the cut. Every complete tar ends with zero blocks (POSIX
ustar; Python's `tarfile`, GNU tar and webdataset's `TarWriter` all write them), so their absence
means the file was cut.

`ShardErrors` counts each failed shard read once (``shard_error``) and, for resampled streams,
stops with a clear error when no usable sample came out of a long run of shard reads that covered
every shard: all shards unreadable (or every sample in them skipped) would otherwise be drawn
again and again forever.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from webdataset.tariterators import group_by_keys, url_opener

from ldmkit.data.skips import SkipCounter

# A resampled stream stops after this many shard reads in a row without a usable sample (and only
# once that run has covered every shard, so a few bad shards among good ones never stop training).
MIN_FAILED_READS = 20
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
            yield from tar_members(stream, source["url"])
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
    exceptions the nested readers report for it, under the shard's url; with `urls` given
    (resampled streams), raises when reads stop producing usable samples (see module docstring)."""

    def __init__(self, skips: SkipCounter, urls: Iterable[str] | None = None, source: str = "webdataset") -> None:
        self.skips, self.url, self.error = skips, "?", None
        self.urls = None if urls is None else set(urls)
        self.source = source
        self.first_error: BaseException | None = None
        self.reads_since_good = 0
        self.drawn_since_good: set[str] = set()

    def track(self, shards: Iterable[dict]) -> Iterator[dict]:
        for shard in shards:
            self.flush()  # the previous shard is finished when the next one is asked for
            self.check_progress()
            self.url = shard["url"]
            self.reads_since_good += 1
            self.drawn_since_good.add(self.url)
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

    def good_sample(self) -> None:
        """A sample was yielded: the stream makes progress."""
        self.reads_since_good = 0
        self.drawn_since_good.clear()

    def check_progress(self) -> None:
        if self.urls is None or self.reads_since_good < MIN_FAILED_READS or not self.urls <= self.drawn_since_good:
            return
        raise RuntimeError(
            f"{self.source}: the last {self.reads_since_good} shard reads, which covered all {len(self.urls)} "
            f"shard(s), gave no usable sample (skipped so far: {self.skips}; first error: {self.first_error}). "
            "Check that the shards are readable tar files with captioned images (e.g. `tar tvf SHARD`), "
            "the data.min_size / data.max_aspect_ratio filters and data.missing_caption."
        )
