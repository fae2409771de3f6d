// index_check.cc — the check of a whole index, read in a child process (isolate.h).
#include "index_check.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>

#include "isolate.h"
#include "layer_file.h"

namespace layer {
namespace {

// In the child: arg is "L" (take a reader slot) or "N" (no locking), then the directory.
Result<std::string> walk_index(const std::string& arg, int) {
  LAYER_ASSIGN(auto index, Index::open(arg.substr(1), Index::Options{.read_only = true,
                                                                     .no_lock = arg[0] != 'L'}));
  LAYER_ASSIGN(IndexWalk w, index->walk());
  return fmt::format("{} {} {} {} {}", w.txnid, w.entries, w.free_pages, w.file_bytes,
                     w.used_bytes);
}

}  // namespace

std::chrono::seconds index_read_timeout(uint64_t bytes) {
  return std::chrono::seconds(120 + 60 * (bytes >> 30));
}

std::string damaged_index_advice(const std::string& index_dir) {
  const std::string root = dir_of(index_dir);
  return fmt::format(
      "Stop its servers and restore a copy: `layer --pool {0} index restore` (the newest; `layer "
      "--pool {0} index ls` lists them), then `layer --pool {0} fsck`",
      root);
}

Result<IndexWalk> check_index(const std::string& index_dir) {
  const std::string data = index_dir + "/data.mdb";
  struct stat st;
  if (::stat(data.c_str(), &st) != 0) return sys_error(errno, "index {}", data);
  const bool lock = ::access((index_dir + "/lock.mdb").c_str(), W_OK) == 0;
  auto answer = run_isolated(fmt::format("reading index {}", data),
                             index_read_timeout(static_cast<uint64_t>(st.st_size)), walk_index,
                             (lock ? "L" : "N") + index_dir);
  if (!answer) {
    const Error& e = answer.error();
    if (e.code != EUCLEAN) return e;
    // "index DIR: why" and "index: why" say the index twice: only the why.
    std::string_view why = e.message;
    for (const std::string& prefix : {"index " + index_dir + ": ", std::string("index: ")})
      if (why.starts_with(prefix)) why.remove_prefix(prefix.size());
    return make_error(EUCLEAN, "index {} is damaged: {}. {}", index_dir, why,
                      damaged_index_advice(index_dir));
  }
  IndexWalk w;
  if (std::sscanf(answer->c_str(), "%lu %lu %lu %lu %lu", &w.txnid, &w.entries, &w.free_pages,
                  &w.file_bytes, &w.used_bytes) != 5)
    return make_error(EIO, "index {}: the check answered \"{}\"", index_dir, *answer);
  return w;
}

}  // namespace layer
