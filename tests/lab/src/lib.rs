//! The test-host lab.
