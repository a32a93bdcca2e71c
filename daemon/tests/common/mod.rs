//! Test helpers shared by the daemon's integration tests.

use std::path::PathBuf;

use cerebro_daemon::scoring::OnnxRuntime;

/// ONNX Runtime for tests: `CEREBRO_ORT_LIBRARY`, else the library the
/// deploy scripts install under `.cerebro/lib`. Without it the test is
/// skipped with a message, unless `CEREBRO_REQUIRE_ORT=1` (set by
/// deploy/test.sh), where a missing library fails the test.
pub fn onnx_runtime() -> Option<OnnxRuntime> {
    let path = std::env::var_os("CEREBRO_ORT_LIBRARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cerebro/lib/libonnxruntime.so.1.31.1"));
    if !path.is_file() {
        if std::env::var("CEREBRO_REQUIRE_ORT").as_deref() == Ok("1") {
            panic!("ONNX Runtime not found at {}; run deploy/test.sh to install it", path.display());
        }
        eprintln!("SKIPPED: ONNX Runtime not found at {} (deploy/test.sh installs it)", path.display());
        return None;
    }
    Some(OnnxRuntime::load(&path, 1).expect("ONNX Runtime loads"))
}
