//! The C library from C: examples/segment.c and the C tests in tests/c/, built with plain gcc
//! against libprosam.so and libprosam.a, run as a cart would run them.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use prosam_models::format::Metadata;
use prosam_models::swin_unetr::Config;

/// Where `cargo build` put libprosam.so / libprosam.a: the profile folder above this test binary.
/// `cargo test` alone does not build them (it links the tests against the rlib), hence the
/// README's `cargo build --release --workspace && cargo test --release --workspace`.
fn built_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let source = crate_dir().join("src/lib.rs").metadata().and_then(|m| m.modified()).unwrap();
    for lib in ["libprosam.so", "libprosam.a"] {
        let built = dir.join(lib).metadata().and_then(|m| m.modified());
        assert!(
            built.is_ok_and(|t| t >= source),
            "{} is missing or older than src/lib.rs: run `cargo build --release --workspace` before the tests",
            dir.join(lib).display()
        );
    }
    dir
}

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A folder with libprosam.so and its SONAME link libprosam.so.2, as an install would have.
fn shared_lib_dir(scratch: &Path) -> PathBuf {
    let lib = scratch.join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    for name in ["libprosam.so", "libprosam.so.2"] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(built_dir().join("libprosam.so"), &link).unwrap();
    }
    lib
}

#[derive(Clone, Copy, Debug)]
enum Linkage {
    Shared,
    Static,
}

/// Compiles a C source with gcc against the chosen library; returns the executable.
fn compile(source: &Path, linkage: Linkage, scratch: &Path, extra: &[&str]) -> PathBuf {
    let stem = source.file_stem().unwrap().to_string_lossy();
    let exe = scratch.join(format!("{stem}_{linkage:?}").to_lowercase());
    let mut cmd = Command::new("gcc");
    cmd.args(["-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-D_POSIX_C_SOURCE=200809L"])
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg(source)
        .arg("-o")
        .arg(&exe)
        .args(extra);
    match linkage {
        Linkage::Shared => {
            let lib = shared_lib_dir(scratch);
            cmd.arg(format!("-L{}", lib.display())).arg("-lprosam").arg(format!("-Wl,-rpath,{}", lib.display()));
        }
        Linkage::Static => {
            cmd.arg(built_dir().join("libprosam.a")).args(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl"]);
        }
    }
    cmd.arg("-lm").arg("-lpthread");
    let out = cmd.output().expect("gcc runs");
    assert!(out.status.success(), "gcc failed for {}:\n{}", source.display(), String::from_utf8_lossy(&out.stderr));
    exe
}

fn run(exe: &Path, args: &[&str]) -> Output {
    let out = Command::new(exe).args(args).output().expect("run C program");
    eprintln!(
        "{} {}\n{}{}",
        exe.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A random-weight fs 12 student with a 64x32x32 window: small enough for valgrind.
fn tiny_model(dir: &Path) -> PathBuf {
    let cfg = Config::tiny();
    let tensors = common::random_weights(&cfg, 0.05);
    let metadata = Metadata { spacing: [1.5, 1.5, 1.5], roi_size: [64, 32, 32], ..Metadata::btcv("tiny_random", cfg) };
    let path = dir.join("tiny.safetensors");
    prosam_models::format::save(&path, metadata, &tensors).unwrap();
    path
}

/// A 40x20x20 volume of random HU, as little-endian float32.
fn small_volume(dir: &Path) -> PathBuf {
    let values: Vec<f32> = (0..40 * 20 * 20).map(|v| ((v * 7919) % 1200) as f32 - 500.0).collect();
    let path = dir.join("small.raw");
    std::fs::write(&path, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    path
}

#[test]
fn every_function_rejects_bad_arguments() {
    let dir = common::scratch_dir("c_api_errors");
    let model = tiny_model(&dir);
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let corrupt = dir.join("corrupt.safetensors");
    std::fs::write(&corrupt, bytes).unwrap();
    let source = crate_dir().join("tests/c/api_errors.c");
    for linkage in [Linkage::Shared, Linkage::Static] {
        let exe = compile(&source, linkage, &dir, &[]);
        let out = run(&exe, &[s(&model), s(&corrupt)]);
        assert!(out.status.success(), "{linkage:?}: api_errors failed");
    }
}

#[test]
fn four_threads_share_one_model() {
    let dir = common::scratch_dir("c_api_threads");
    let model = tiny_model(&dir);
    let volume = small_volume(&dir);
    let exe = compile(&crate_dir().join("tests/c/threads.c"), Linkage::Shared, &dir, &[]);
    let out = run(&exe, &[s(&model), s(&volume), "40", "20", "20", "1.5"]);
    assert!(out.status.success(), "threads disagree or failed");
}

#[test]
fn soak_four_threads_fifty_calls_each() {
    let dir = common::scratch_dir("c_api_soak");
    let model = tiny_model(&dir);
    let volume = small_volume(&dir);
    let exe = compile(&crate_dir().join("tests/c/soak.c"), Linkage::Shared, &dir, &[]);
    let out = run(&exe, &[s(&model), s(&volume), "40", "20", "20", "1.5", "50"]);
    assert!(out.status.success(), "the soak test failed: outputs differed or the memory in use grew");
}

#[test]
fn memcheck_finds_no_invalid_access_and_no_leak() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("SKIPPED: valgrind is not installed (scripts/install-deps.sh installs it)");
        return;
    }
    let dir = common::scratch_dir("c_api_valgrind");
    let model = tiny_model(&dir);
    let volume = small_volume(&dir);
    let exe = compile(&crate_dir().join("examples/segment.c"), Linkage::Shared, &dir, &[]);
    let identity = ["1.5", "0", "0", "0", "0", "1.5", "0", "0", "0", "0", "1.5", "0"];
    let mut args =
        vec!["--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite", "--track-origins=no"];
    args.push(s(&exe));
    let mut program = vec![s(&model), s(&volume), "40", "20", "20"];
    program.extend(identity);
    args.extend(program);
    let out = Command::new("valgrind").args(&args).env("RAYON_NUM_THREADS", "2").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "{}",
        stderr
            .lines()
            .filter(|l| l.contains("ERROR SUMMARY") || l.contains("definitely lost"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(out.status.code(), Some(0), "valgrind reported errors:\n{stderr}");
    assert!(stderr.contains("ERROR SUMMARY: 0 errors"), "{stderr}");
}

#[test]
fn example_labels_equal_prosam_segment() {
    let dir = common::scratch_dir("c_api_example");
    let (Some(ckpt), Some(ct)) =
        (common::shared_file("fixtures/monai/swinunetr_fs12.pt"), common::shared_file("data/example_ct_sm.nii.gz"))
    else {
        return;
    };
    let imported =
        prosam_models::format::import::import_monai(&ckpt, prosam_models::format::import::MonaiOptions::default())
            .unwrap();
    // At the CT's own 3 mm spacing the model grid is 122x101x30: 4 windows instead of the 20 the
    // BTCV spacing gives, and the comparison (C against the CLI) is the same.
    let metadata = Metadata { spacing: [3.0, 3.0, 3.0], ..Metadata::btcv("swinunetr_fs12", imported.config.clone()) };
    let model = dir.join("fs12.safetensors");
    prosam_models::format::save(&model, metadata, &imported.tensors).unwrap();

    // The test helper: the NIfTI as raw float32 HU plus its affine on the command line.
    let input = prosam_runtime::volume::nifti::read(&ct).unwrap();
    let raw = dir.join("ct.raw");
    std::fs::write(&raw, input.volume.data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let dims = input.volume.dims.map(|d| d.to_string());
    let affine: Vec<String> = (0..3)
        .flat_map(|r| (0..4).map(move |c| (r, c)))
        .map(|(r, c)| format!("{:.17e}", input.volume.affine.0[r][c]))
        .collect();

    // prosam segment's labels: the CLI when it was built beside this test, else the same engine.
    let cli = built_dir().join("prosam");
    let expected: Vec<u8> = if cli.is_file() {
        let seg = dir.join("seg.nii.gz");
        let out = Command::new(&cli)
            .args(["segment", "-m", s(&model), "-i", s(&ct), "-o", s(&seg), "--quiet"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        prosam_runtime::volume::nifti::read(&seg).unwrap().volume.data.iter().map(|&v| v as u8).collect()
    } else {
        let segmenter = prosam_runtime::engine::Segmenter::load(&model, Default::default()).unwrap();
        segmenter.segment(input.volume.clone(), &mut |_, _| true).unwrap().labels
    };

    let source = crate_dir().join("examples/segment.c");
    for linkage in [Linkage::Shared, Linkage::Static] {
        let exe = compile(&source, linkage, &dir, &[]);
        let labels = dir.join(format!("labels_{linkage:?}.raw"));
        let mut args: Vec<&str> = vec![s(&model), s(&raw), &dims[0], &dims[1], &dims[2]];
        args.extend(affine.iter().map(String::as_str));
        args.push(s(&labels));
        let out = run(&exe, &args);
        assert!(out.status.success(), "{linkage:?}: the example failed");
        let got = std::fs::read(&labels).unwrap();
        assert_eq!(got.len(), expected.len());
        let differ = got.iter().zip(&expected).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{linkage:?}: {differ} voxels differ from prosam segment");
    }
}

#[test]
fn install_gives_pkg_config_and_cmake_packages() {
    let dir = common::scratch_dir("c_api_install");
    let prefix = dir.join("prefix");
    let out = Command::new(crate_dir().join("install.sh"))
        .arg(&prefix)
        .env("CARGO_TARGET_DIR", built_dir().parent().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "install.sh: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_link(prefix.join("lib/libprosam.so.2")).unwrap(), Path::new("libprosam.so.0.1.0"));

    let pc_path = prefix.join("lib/pkgconfig");
    let pkg = |flag: &str| {
        let out = Command::new("pkg-config")
            .arg(flag)
            .arg("prosam")
            .env("PKG_CONFIG_PATH", &pc_path)
            .output()
            .expect("pkg-config");
        assert!(out.status.success(), "pkg-config {flag}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let (cflags, libs) = (pkg("--cflags"), pkg("--libs"));
    assert_eq!(libs, format!("-L{}/lib -lprosam", prefix.display()));
    let exe = dir.join("segment_pkgconfig");
    let mut cmd = Command::new("gcc");
    cmd.arg(crate_dir().join("examples/segment.c"))
        .arg("-o")
        .arg(&exe)
        .args(cflags.split_whitespace())
        .args(libs.split_whitespace());
    cmd.arg(format!("-Wl,-rpath,{}/lib", prefix.display())).arg("-lm");
    assert!(cmd.status().unwrap().success(), "gcc with pkg-config flags");
    // With no arguments the example prints its usage and exits 2: it linked and loaded.
    assert_eq!(Command::new(&exe).output().unwrap().status.code(), Some(2));

    if Command::new("cmake").arg("--version").output().is_err() {
        eprintln!("SKIPPED the CMake check: cmake is not installed (scripts/install-deps.sh installs it)");
        return;
    }
    let project = dir.join("cmake_project");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(
        project.join("CMakeLists.txt"),
        format!(
            "cmake_minimum_required(VERSION 3.16)\nproject(cart C)\nfind_package(prosam 0.1 REQUIRED)\n\
             add_executable(cart_shared {src})\ntarget_link_libraries(cart_shared PRIVATE prosam::prosam m)\n\
             add_executable(cart_static {src})\ntarget_link_libraries(cart_static PRIVATE prosam::prosam_static m)\n",
            src = crate_dir().join("examples/segment.c").display()
        ),
    )
    .unwrap();
    let build = project.join("build");
    let configure = Command::new("cmake")
        .arg("-S")
        .arg(&project)
        .arg("-B")
        .arg(&build)
        .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display()))
        .output()
        .unwrap();
    assert!(
        configure.status.success(),
        "cmake configure: {}{}",
        String::from_utf8_lossy(&configure.stdout),
        String::from_utf8_lossy(&configure.stderr)
    );
    let compile = Command::new("cmake").arg("--build").arg(&build).output().unwrap();
    assert!(compile.status.success(), "cmake build: {}", String::from_utf8_lossy(&compile.stdout));
    for exe in ["cart_shared", "cart_static"] {
        assert_eq!(Command::new(build.join(exe)).output().unwrap().status.code(), Some(2), "{exe}");
    }
}
