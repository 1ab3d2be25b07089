// Whether this build's kernels can run on the current device (read once by Python before the backend is used).
#pragma once

#include <string>

namespace tk {

// "" when a test kernel launches and writes its result on the current device; otherwise why not.
std::string probe_launch();

}  // namespace tk
