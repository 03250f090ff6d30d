//! QEMU integration-test harness.
