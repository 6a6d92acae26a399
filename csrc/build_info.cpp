// The build queries of mtbert_fast._C, answered by every build, with or without the CUDA kernels.
#include "build_info.h"

#include <torch/library.h>

#define MTBF_STRINGIZE2(x) #x
#define MTBF_STRINGIZE(x) MTBF_STRINGIZE2(x)

namespace mtbert_fast {

std::string built_cuda_archs() {
#ifdef MTBERT_FAST_CUDA_ARCHS
  // one preprocessor token, "sm_80__sm_90__compute_90": "__" separates the names
  const std::string s = MTBF_STRINGIZE(MTBERT_FAST_CUDA_ARCHS);
#else
  const std::string s;
#endif
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '_' && i + 1 < s.size() && s[i + 1] == '_') {
      out += ' ';
      ++i;
    } else {
      out += s[i];
    }
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(mtbert_fast_C, m) { m.def("cuda_archs() -> str", &built_cuda_archs); }

}  // namespace mtbert_fast
