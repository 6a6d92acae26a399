// What this build of mtbert_fast._C holds, for the kernels' own messages and for the Python dispatch.
#pragma once

#include <string>

namespace mtbert_fast {

// "sm_80 sm_90 compute_90": the machine-code (sm_) and PTX (compute_) architectures setup.py compiled the CUDA
// kernels for (TORCH_CUDA_ARCH_LIST); empty for a build without CUDA.
std::string built_cuda_archs();

}  // namespace mtbert_fast
