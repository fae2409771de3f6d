#!/usr/bin/python3
# pagecache.py — a file's pages in the page cache, for test_boot_prefetch.sh and bench/prefetch:
#   pagecache.py drop FILE               posix_fadvise(DONTNEED) of the whole file (clean pages go)
#   pagecache.py resident FILE [RANGES]  prints "RESIDENT TOTAL": the bytes of FILE's pages in
#                                        the page cache (mincore(2) of a read-only mapping) and of
#                                        all its pages; with RANGES (JSON [[offset, length], ...])
#                                        only the pages those ranges touch
import ctypes
import json
import mmap
import os
import sys

PAGE = os.sysconf("SC_PAGE_SIZE")


def drop(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_pages(path):
    size = os.path.getsize(path)
    pages = (size + PAGE - 1) // PAGE
    if pages == 0:
        return b""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap " + path)
        vec = ctypes.create_string_buffer(pages)
        try:
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore " + path)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return vec.raw[:pages]


def resident(path, ranges):
    vec = resident_pages(path)
    if ranges is None:
        ranges = [[0, len(vec) * PAGE]]
    pages = set()
    for off, length in ranges:
        pages.update(p for p in range(off // PAGE, (off + length + PAGE - 1) // PAGE)
                     if p < len(vec))
    return sum(PAGE for p in pages if vec[p] & 1), len(pages) * PAGE


if __name__ == "__main__":
    if sys.argv[1] == "drop":
        drop(sys.argv[2])
    elif sys.argv[1] == "resident":
        print(*resident(sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else None))
    else:
        sys.exit("usage: pagecache.py drop|resident FILE [RANGES]")
