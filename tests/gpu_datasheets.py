"""NVIDIA data-sheet numbers of the GPUs the suite sizes kernel 1's launches for without a GPU (tests/gpu_compile.py
and the launcher's unit tests), by compute capability: (multiprocessors, shared memory bytes each, the most one
block may take) of an H100 SXM (sm_90, as the lent H200), an L4 (sm_89), an A10 (sm_86; sm_80's code with less
shared memory), an A100 (sm_80) and a T4 (sm_75)."""

H100, L4, A10, A100, T4 = ((132, 233472, 232448), (58, 102400, 101376), (72, 102400, 101376),
                           (108, 167936, 166912), (40, 65536, 65536))
MODELLED_GPUS = {90: H100, 89: L4, 86: A10, 80: A100, 75: T4}
THREADS_A_MULTIPROCESSOR = {90: 2048, 89: 1536, 86: 1536, 80: 2048, 75: 1024}  # and 65,536 registers each
