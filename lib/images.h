// images.h — images: listing and removal (import is in import.h).
//
// An image is an `images` row "NAME:VER" naming its top layer (frozen); an image made by
// `layer commit` has its container's chain below that layer. Removal drops the row and its
// reference to the top layer (layers.h); a layer goes when nothing else refers to it.
//
// Thread-safety: safe to call concurrently; each change is one transaction that re-reads what it
// depends on.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "error.h"
#include "pool.h"
#include "records.h"

namespace layer {

struct ImageInfo {
  ImageRecord image;
  LayerRecord layer;
  uint64_t data_blocks = 0;
  uint32_t containers = 0;  // containers cloned from it
};

// Every image, in ref order, with the data blocks of its top layer and the containers using it.
// Errors: EIO.
Result<std::vector<ImageInfo>> list_images(Pool& pool);
// Removes image `ref`; its layers go when nothing else refers to them. Errors: EINVAL (bad
// ref), EACCES (read-only pool), ENOENT, EBUSY (containers use it: names them), EIO.
Status remove_image(Pool& pool, const std::string& ref);

}  // namespace layer
