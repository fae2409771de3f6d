// apply_cmd.h — `layer apply SPEC.json [--dry-run] [--prune]` (lib/apply.h; docs/apply.md),
// registered by layer.cc.
#pragma once

#include <string>

#include "error.h"

namespace layer_cli {

struct ApplyArgs {
  std::string spec;  // the spec file; "-" reads stdin
  bool dry_run = false;
  bool prune = false;
};

// Runs `layer apply` on the pool at pool_root; prints the plan or what was done (JSON with
// `json`). Returns the exit status, or the Error main() reports on one line (a bad spec:
// EINVAL "SPEC: FIELD: reason"; nothing was changed unless the message says otherwise).
layer::Result<int> run_apply(const std::string& pool_root, bool json, const ApplyArgs& args);

}  // namespace layer_cli
