// The simulator's fiber switch (simt.h, `FiberContext`) on x86-64: saves the callee-saved registers, MXCSR and the
// x87 control word on the current stack, stores the stack pointer, loads the other fiber's and restores its state.
// swapcontext did the same plus two rt_sigprocmask system calls per switch (the signal mask, which fibers never
// change): 1.9 million of them for the racecheck driver of tests/test_sanitizers.py, 70 s of its 110 s in the kernel.
#if defined(__x86_64__)

// simt_fiber_switch(void** save_sp /* rdi */, void* load_sp /* rsi */). The frame it leaves, from the saved stack
// pointer up: MXCSR (4 bytes), x87 control word (2, padded to 8), r15, r14, r13, r12, rbx, rbp, return address.
// simt_fiber_start is the return address of a fiber's first frame (simt::FiberContext::start): it calls r12(r13)
// with the stack aligned as the ABI wants, and the entry never returns (it switches away for good).
asm(R"(
  .text
  .globl simt_fiber_switch
  .hidden simt_fiber_switch
  .type simt_fiber_switch, @function
simt_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size simt_fiber_switch, .-simt_fiber_switch

  .globl simt_fiber_start
  .hidden simt_fiber_start
  .type simt_fiber_start, @function
simt_fiber_start:
  movq %r13, %rdi
  callq *%r12
  ud2
  .size simt_fiber_start, .-simt_fiber_start
)");

#endif
