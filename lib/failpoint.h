// failpoint.h — named points where a crash test can kill the process.
//
// LAYER_FAILPOINT=NAME kills the process (SIGKILL: no handler, no flush, no destructor runs)
// the first time it passes point NAME; NAME@N the Nth time, counting from the last Pool::open.
// Crash tests use it to land a crash exactly inside a window a random kill rarely hits: between a
// delta's fdatasync and the index commit that names the data, between a commit and its answer, in a
// copy-up. Points are named "module.event" (docs/design.md lists them). Unset, a point costs one
// relaxed load.
//
// Thread-safety: any thread; the count is shared by the process.
#pragma once

#include <string_view>

namespace layer {

// Counts a pass of `point`; SIGKILLs the process when LAYER_FAILPOINT names it and this is the
// pass it names.
void failpoint(std::string_view point);

// Reads LAYER_FAILPOINT again, counting from zero (Pool::open calls it: a test may set the
// variable in a forked child after the parent passed a point).
void rearm_failpoint();

}  // namespace layer
