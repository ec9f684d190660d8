// Spin-waiting inside a CPU op whose threads meet without ggml's barrier.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

// Tells the core this thread is spinning (a pause on x86, a yield on ARM), so that its sibling
// hyper-thread and the memory bus get the cycles.
inline void dm_cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}
