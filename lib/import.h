// import.h — import of a raw disk image (a file or a block device) as a new image.
//
// The image is one frozen, hashed layer without a parent, built invisibly under an import
// intent (LayerBuild, layer_build.h) and published with its `images` row in one transaction.
//
// Thread-safety: safe to call concurrently (each import builds its own layer); the Pool must be
// open writable.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "error.h"
#include "images.h"
#include "pool.h"

namespace layer {

// Called as the copy goes, with bytes of the source done so far and its size.
using ImportProgress = std::function<void(uint64_t done_bytes, uint64_t total_bytes)>;

// Imports a raw disk image as image `ref` (one frozen, hashed layer). Holes (SEEK_DATA) and
// all-zero blocks are stored as nothing. The file size must be a multiple of 512 and at most
// kMaxDiskBytes (and what the tiers hold: Pool::check_tiers_hold). The new layer is locked
// exclusively from before its intent is visible until it is published or rolled back, so
// fsck --repair leaves a running import alone.
// A failed import removes its rows, its intent and the layer file only if it created it.
// Calls the test points "import.intent-committed", "import.data-walked" and
// "import.rows-committed". progress may be empty.
// Errors: EINVAL (bad ref, block size or file size), EACCES (read-only pool), EEXIST,
// ENOENT/EACCES (file), EBUSY (the file's size, mtime or ctime changed during the copy),
// ENOSPC, EIO.
Result<ImageInfo> import_image(Pool& pool, const std::string& ref, const std::string& file,
                               uint32_t block_size, const ImportProgress& progress,
                               const std::string& description = "");

}  // namespace layer
