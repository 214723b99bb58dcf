//! Reconciler tests against the fake and the fault injector (no kernel).
