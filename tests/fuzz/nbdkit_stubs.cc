// nbdkit_stubs.cc — nbdkit's logging calls for plugin code linked into a fuzz target, where no
// nbdkit is there to provide them. The message is formatted (so a bad argument for its format
// still shows under ASan) and dropped: fuzzing would otherwise drown in it.
#include <cstdarg>
#include <cstdio>

extern "C" {

void nbdkit_verror(const char* fmt, va_list args) {
  char buf[1024];
  std::vsnprintf(buf, sizeof buf, fmt, args);
}

void nbdkit_error(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  nbdkit_verror(fmt, args);
  va_end(args);
}

void nbdkit_vdebug(const char* fmt, va_list args) { nbdkit_verror(fmt, args); }

void nbdkit_debug(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  nbdkit_verror(fmt, args);
  va_end(args);
}
}
