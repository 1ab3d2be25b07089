"""Tooling around the runtime package: the `check` table (verify), benchmarks (bench), the ahead-of-time
resource report (resources), toolchain discovery and the accuracy rule the tests share (testing).

Nothing in the runtime (ops, nn, models, backends) imports from here."""
