//! Shared helpers for the guest-side test suites.
