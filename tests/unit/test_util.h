// test_util.h — small helpers shared by the unit tests: temp dirs, Result checks, seeds,
// raw image files and forked child processes. Header-only; every helper cleans up after itself.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "error.h"
#include "import.h"
#include "pool.h"

namespace test {

// A directory made with mkdtemp under $TMPDIR (or /tmp), removed with its contents when the
// object is destroyed.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base && *base ? base : "/tmp") + "/layer-unit-XXXXXX";
    std::vector<char> buf(pattern.begin(), pattern.end());
    buf.push_back('\0');
    if (mkdtemp(buf.data()) == nullptr) {
      FAIL("mkdtemp " << pattern << ": " << std::strerror(errno));
    }
    path_ = buf.data();
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

inline std::string describe(const layer::Error& e) {
  return e.message + " (errno " + std::to_string(e.code) + " " + std::strerror(e.code) + ")";
}

// Returns r's value, or fails the test naming the expression and the error.
template <typename T>
T must(layer::Result<T> r, const char* expr) {
  if (!r.ok()) FAIL(expr << " failed: " << describe(r.error()));
  return std::move(r).value();
}
inline void must(layer::Status r, const char* expr) {
  if (!r.ok()) FAIL(expr << " failed: " << describe(r.error()));
}

// Returns r's error, or fails the test when r succeeded.
template <typename R>
layer::Error error_of(const R& r, const char* expr) {
  if (r.ok()) FAIL(expr << " succeeded, expected an error");
  return r.error();
}

}  // namespace test

#define MUST(expr) ::test::must((expr), #expr)
#define REQUIRE_OK(expr) ::test::must((expr), #expr)
// Requires that expr fails with errno `code`; evaluates to the Error.
#define ERROR_OF(expr) ::test::error_of((expr), #expr)
#define REQUIRE_ERRNO(expr, errcode)                          \
  do {                                                        \
    const auto layer_test_e_ = ERROR_OF(expr);                \
    INFO(#expr << " -> " << ::test::describe(layer_test_e_)); \
    REQUIRE(layer_test_e_.code == (errcode));                 \
  } while (0)
#define CHECK_ERRNO(expr, errcode)                                                          \
  do {                                                                                      \
    const auto& layer_test_r_ = (expr);                                                     \
    INFO(#expr << (layer_test_r_.ok() ? std::string(" succeeded")                           \
                                      : " -> " + ::test::describe(layer_test_r_.error()))); \
    CHECK(!layer_test_r_.ok());                                                             \
    if (!layer_test_r_.ok()) CHECK(layer_test_r_.error().code == (errcode));                \
  } while (0)

namespace test {

// The seed of a random test: Catch's --rng-seed, or LAYER_TEST_SEED from the environment.
// Printed so a failure can be replayed.
inline uint64_t test_seed(const char* test_name) {
  uint64_t seed = Catch::rngSeed();
  if (const char* env = std::getenv("LAYER_TEST_SEED"); env && *env) {
    seed = std::strtoull(env, nullptr, 0);
  }
  std::cerr << test_name << ": seed " << seed << " (replay with --rng-seed " << seed
            << " or LAYER_TEST_SEED=" << seed << ")\n";
  return seed;
}

inline std::vector<uint8_t> random_bytes(std::mt19937_64& rng, size_t n) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; i += 8) {
    uint64_t x = rng();
    for (size_t j = 0; j < 8 && i + j < n; j++) v[i + j] = static_cast<uint8_t>(x >> (8 * j));
  }
  return v;
}

// An fd closed in the destructor.
class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(Fd&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      if (fd_ >= 0) ::close(fd_);
      fd_ = o.fd_;
      o.fd_ = -1;
    }
    return *this;
  }
  int get() const { return fd_; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
};

inline void pwrite_all(int fd, const void* buf, size_t len, uint64_t offset) {
  const char* p = static_cast<const char*>(buf);
  while (len > 0) {
    ssize_t n = ::pwrite(fd, p, len, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) FAIL("pwrite: " << std::strerror(errno));
    p += n;
    len -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

inline std::vector<uint8_t> read_file(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) FAIL("open " << path << ": " << std::strerror(errno));
  struct stat st;
  REQUIRE(::fstat(fd.get(), &st) == 0);
  std::vector<uint8_t> out(static_cast<size_t>(st.st_size));
  size_t done = 0;
  while (done < out.size()) {
    ssize_t n = ::pread(fd.get(), out.data() + done, out.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) FAIL("pread " << path << ": " << std::strerror(errno));
    done += static_cast<size_t>(n);
  }
  return out;
}

// Writes a raw image file of `size` bytes: every byte of `content` that is in a data range is
// written; everything else stays a hole. `content.size()` must equal `size`.
// Ranges are (offset, length) pairs.
inline void write_raw_image(const std::string& path, const std::vector<uint8_t>& content,
                            const std::vector<std::pair<uint64_t, uint64_t>>& data_ranges) {
  Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd.get() < 0) FAIL("create " << path << ": " << std::strerror(errno));
  REQUIRE(::ftruncate(fd.get(), static_cast<off_t>(content.size())) == 0);
  for (auto [off, len] : data_ranges) {
    REQUIRE(off + len <= content.size());
    pwrite_all(fd.get(), content.data() + off, len, off);
  }
}

inline bool all_zero(const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (p[i] != 0) return false;
  return true;
}

// A forked child running `body` (whose return value is its exit status). The child never
// returns into Catch: it leaves with _exit. The destructor kills and reaps a child still running.
class Child {
 public:
  explicit Child(const std::function<int()>& body) {
    std::cout.flush();
    std::cerr.flush();
    pid_ = ::fork();
    if (pid_ < 0) FAIL("fork: " << std::strerror(errno));
    if (pid_ == 0) {
      int rc = 99;
      try {
        rc = body();
      } catch (...) {
        rc = 98;
      }
      ::_exit(rc);
    }
  }
  ~Child() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      int st;
      while (::waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
      }
    }
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  pid_t pid() const { return pid_; }
  // Waits for the child; returns its exit status (or 128+signal).
  int wait() {
    REQUIRE(pid_ > 0);
    int st = 0;
    pid_t r;
    while ((r = ::waitpid(pid_, &st, 0)) < 0 && errno == EINTR) {
    }
    REQUIRE(r == pid_);
    pid_ = -1;
    if (WIFEXITED(st)) return WEXITSTATUS(st);
    if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
    return 255;
  }

 private:
  pid_t pid_ = -1;
};

// A pipe used to hand a byte between parent and child.
struct Pipe {
  Fd read_end, write_end;
  Pipe() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) FAIL("pipe: " << std::strerror(errno));
    read_end = Fd(fds[0]);
    write_end = Fd(fds[1]);
  }
};

// Blocks until a byte arrives or the other end is closed; returns false on EOF.
inline bool read_byte(int fd) {
  char c;
  for (;;) {
    ssize_t n = ::read(fd, &c, 1);
    if (n < 0 && errno == EINTR) continue;
    return n == 1;
  }
}
inline void write_byte(int fd) {
  char c = 'x';
  while (::write(fd, &c, 1) < 0 && errno == EINTR) {
  }
}

// Writes a raw image of size_bytes made of block_size blocks, each (by block_no % 6): random
// data, written zeroes, a hole, data in the first 100 bytes only, random data, a hole.
// Returns the content; *data_blocks gets the number of blocks holding a non-zero byte.
inline std::vector<uint8_t> write_patterned_image(const std::string& path, uint64_t size_bytes,
                                                  uint32_t block_size, uint64_t seed,
                                                  uint64_t* data_blocks = nullptr) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> content(size_bytes, 0);
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  uint64_t data = 0;
  for (uint64_t b = 0; b * block_size < size_bytes; b++) {
    const uint64_t off = b * block_size;
    const uint64_t len = std::min<uint64_t>(block_size, size_bytes - off);
    switch (b % 6) {
      case 0:
      case 4: {
        auto bytes = random_bytes(rng, len);
        bytes[0] |= 1;  // never all zero
        std::copy(bytes.begin(), bytes.end(), content.begin() + static_cast<long>(off));
        ranges.emplace_back(off, len);
        data++;
        break;
      }
      case 1:
        ranges.emplace_back(off, len);  // written zeroes: allocated, but no data
        break;
      case 3: {
        auto bytes = random_bytes(rng, std::min<uint64_t>(100, len));
        bytes[0] |= 1;
        std::copy(bytes.begin(), bytes.end(), content.begin() + static_cast<long>(off));
        ranges.emplace_back(off, len);
        data++;
        break;
      }
      default:
        break;  // hole
    }
  }
  write_raw_image(path, content, ranges);
  if (data_blocks) *data_blocks = data;
  return content;
}

// A fresh pool in a temp dir (POOL = tmp/pool), opened read-write.
struct PoolFixture {
  TempDir tmp;
  std::string root;
  std::unique_ptr<layer::Pool> pool;

  PoolFixture() : root(tmp.sub("pool")) {
    MUST(layer::Pool::create(root, "", ""));
    reopen();
  }
  void reopen() {
    pool.reset();
    pool = MUST(layer::Pool::open(root, layer::Pool::OpenOptions{}));
  }
  // Imports a patterned image `ref` of size_bytes; returns its content.
  std::vector<uint8_t> import(const std::string& ref, uint64_t size_bytes, uint32_t block_size,
                              uint64_t seed) {
    const std::string file = tmp.sub("img-" + std::to_string(seed) + ".raw");
    auto content = write_patterned_image(file, size_bytes, block_size, seed);
    MUST(layer::import_image(*pool, ref, file, block_size, nullptr));
    std::filesystem::remove(file);
    return content;
  }
};

// The top layer of image `ref` (REQUIRE: it exists).
inline layer::LayerId image_top_layer(layer::Pool& pool, const std::string& ref) {
  auto txn = MUST(pool.index().begin_read());
  auto v = MUST(txn.get(layer::Db::kImages, ref));
  REQUIRE(v);
  return MUST(layer::decode_image(*v, ref)).top_layer;
}

// XORs the byte at `offset` of the file at `path` with `mask` (damage for checksum tests).
inline void flip_bits(const std::string& path, uint64_t offset, uint8_t mask) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(fd >= 0);
  uint8_t b = 0;
  REQUIRE(::pread(fd, &b, 1, static_cast<off_t>(offset)) == 1);
  b ^= mask;
  REQUIRE(::pwrite(fd, &b, 1, static_cast<off_t>(offset)) == 1);
  ::close(fd);
}

}  // namespace test
