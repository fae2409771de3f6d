// index_check.h — reading an index that may be damaged, in a child process.
//
// LMDB keeps no page checksums: random bytes in data.mdb can make its reader follow a wild
// pointer (SIGSEGV), read past the end of the file (SIGBUS) or fail an assertion (SIGABRT).
// Whatever reads a whole index that nothing has vouched for — fsck's first look, a server's
// get_ready, a backup's compact copy, a restore's check of the copy it is about to install — does
// so in a child process (isolate.h), and a crash there becomes an error naming the damage and
// what to do ("index damaged"), never a crash of the caller.
//
// Thread-safety: the functions may be called from any thread; the child runs only the body.
#pragma once

#include <chrono>
#include <string>

#include "error.h"
#include "index.h"

namespace layer {

// A time limit for reading an index file of `bytes`: generous (2 minutes, plus one per GiB),
// since exceeding it reads as damage.
std::chrono::seconds index_read_timeout(uint64_t bytes);

// Reads every page of the index in directory `index_dir` (Index::walk) in a child process:
// read-only, with a reader slot when lock.mdb exists and is writable (consistent beside
// writers), else without locking (nothing is created: nbdkit's get_ready). Errors: EUCLEAN
// "index DIR is damaged: WHY. Restore a copy: ..." (one line, with what to do), ENOENT (no
// index), EACCES, EIO.
Result<IndexWalk> check_index(const std::string& index_dir);

// The advice that ends every "index damaged" message for the pool whose index is index_dir.
std::string damaged_index_advice(const std::string& index_dir);

}  // namespace layer
