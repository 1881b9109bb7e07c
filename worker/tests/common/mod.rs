//! Helpers shared by the worker's integration tests (each test file uses some of them).
#![allow(dead_code)]

use candle_core::Device;

/// The largest absolute difference between two equally shaped tables of values.
pub(crate) fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// The device the device-generic tests run on, as `--device` spells it: `DELTA_TEST_DEVICE`,
/// `cpu` by default; `scripts/test-cuda.sh` sets `cuda:0` on a GPU machine.
pub(crate) fn test_device_name() -> String {
    std::env::var("DELTA_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

/// [`test_device_name`] opened. A CUDA device that cannot be opened fails the test: the
/// run asked for it.
pub(crate) fn test_device() -> Device {
    let name = test_device_name();
    match name.strip_prefix("cuda:") {
        None if name == "cpu" => Device::Cpu,
        None => panic!("DELTA_TEST_DEVICE={name:?} is not cpu or cuda:N"),
        Some(n) => {
            let n: usize = n.parse().expect("DELTA_TEST_DEVICE=cuda:N");
            Device::new_cuda(n).unwrap_or_else(|e| panic!("DELTA_TEST_DEVICE={name}: {e}"))
        }
    }
}

/// How far results on the test device may be from the CPU's: exact on the CPU, and on a
/// GPU the difference of summation order in its kernels (cuBLAS, reductions) in f32.
pub(crate) fn device_tolerance(cpu: f32) -> f32 {
    if test_device_name() == "cpu" {
        cpu
    } else {
        cpu.max(1e-4)
    }
}

/// The `delta-worker` binary the process tests run: `DELTA_WORKER_BIN` where the test
/// binaries were copied to another machine (`scripts/test-cuda.sh`), else cargo's.
pub(crate) fn worker_bin() -> std::path::PathBuf {
    std::env::var_os("DELTA_WORKER_BIN")
        .map_or_else(|| env!("CARGO_BIN_EXE_delta-worker").into(), Into::into)
}
