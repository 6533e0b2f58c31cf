//! Distillation: the KD losses against f64 loops with their gradients, a teacher that sees the
//! student's crop (a teacher identical to the student leaves no KD loss), mismatched teachers
//! refused by name, exact resumption, and phantoms -> `distill` -> `prosam segment` -> `prosam
//! eval` through the binaries.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor, Var};
use prosam_distill::data::{Case, Dataset, load_case};
use prosam_distill::loss::{KdLoss, distillation_loss, kd_loss};
use prosam_distill::student::{DistillOptions, StudentTrainer, Teacher, student_random_weights};
use prosam_models::format::Metadata;
use prosam_models::swin_unetr::Config;

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn softmax(logits: &[f64], classes: usize, n: usize, v: usize, scale: f64) -> Vec<f64> {
    let z: Vec<f64> = (0..classes).map(|c| logits[c * n + v] / scale).collect();
    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = z.iter().map(|x| (x - max).exp()).sum();
    z.iter().map(|x| (x - max).exp() / sum).collect()
}

/// The KD terms written out in f64 loops, for logits `(1, classes, n voxels)`.
fn kd_reference(s: &[f64], t: &[f64], classes: usize, kind: KdLoss) -> f64 {
    let n = s.len() / classes;
    match kind {
        KdLoss::MseLogits => s.iter().zip(t).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / s.len() as f64,
        KdLoss::MseProbabilities => {
            let mut total = 0.0;
            for v in 0..n {
                let (p, q) = (softmax(s, classes, n, v, 1.0), softmax(t, classes, n, v, 1.0));
                total += p.iter().zip(&q).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
            }
            total / s.len() as f64
        }
        KdLoss::Kl { temperature } => {
            let mut total = 0.0;
            for v in 0..n {
                let (p, q) = (softmax(s, classes, n, v, temperature), softmax(t, classes, n, v, temperature));
                total += q.iter().zip(&p).map(|(qt, ps)| qt * (qt.ln() - ps.ln())).sum::<f64>();
            }
            temperature * temperature * total / n as f64
        }
    }
}

#[test]
fn kd_losses_match_f64_loops_and_their_gradients() {
    let (classes, n) = (4, 30);
    let shape = vec![1, classes, 3, 2, 5];
    let s: Vec<f64> = (0..classes * n).map(|i| ((i * 37 % 23) as f64 / 7.0 - 1.5) * 0.8).collect();
    let t: Vec<f64> = (0..classes * n).map(|i| ((i * 11 % 17) as f64 / 5.0 - 1.7) * 1.1).collect();
    // A variable, so that a graph through the teacher would show as its gradient.
    let teacher_var = Var::from_vec(t.clone(), shape.clone(), &Device::Cpu).unwrap();
    let teacher = teacher_var.as_tensor().clone();
    for kind in
        [KdLoss::MseLogits, KdLoss::MseProbabilities, KdLoss::Kl { temperature: 1.0 }, KdLoss::Kl { temperature: 2.5 }]
    {
        let var = Var::from_vec(s.clone(), shape.clone(), &Device::Cpu).unwrap();
        let loss = kd_loss(var.as_tensor(), &teacher, kind).unwrap();
        let want = kd_reference(&s, &t, classes, kind);
        assert!((loss.to_scalar::<f64>().unwrap() - want).abs() < 1e-12, "{kind:?}: {loss} vs {want}");
        let grads = loss.backward().unwrap();
        assert!(grads.get(teacher_var.as_tensor()).is_none(), "{kind:?}: the teacher gets no gradient");
        let grad = values(grads.get(var.as_tensor()).unwrap());
        for i in [0, 9, 31, 64, 119] {
            let h = 1e-6;
            let at = |d: f64| {
                let mut l = s.clone();
                l[i] += d;
                kd_reference(&l, &t, classes, kind)
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!((fd - grad[i]).abs() < 1e-8, "{kind:?} d/ds[{i}]: {} vs {fd}", grad[i]);
        }
    }
    // The spec's L: (1 - lambda) DiceCE + lambda KD, and DiceCE alone without a teacher.
    let student = Tensor::from_vec(s.clone(), shape.clone(), &Device::Cpu).unwrap();
    let labels =
        Tensor::from_vec((0..n as u32).map(|i| i % 3).collect::<Vec<_>>(), (1, 3, 2, 5), &Device::Cpu).unwrap();
    let dice_ce = prosam_distill::loss::teacher_loss(&student, &labels, None).unwrap().to_scalar::<f64>().unwrap();
    let kd = kd_reference(&s, &t, classes, KdLoss::MseLogits);
    let l = distillation_loss(&student, &labels, Some(&teacher), 0.3, KdLoss::MseLogits, None).unwrap();
    assert!((l.to_scalar::<f64>().unwrap() - (0.7 * dice_ce + 0.3 * kd)).abs() < 1e-12);
    let alone = distillation_loss(&student, &labels, None, 0.0, KdLoss::MseLogits, None).unwrap();
    assert_eq!(alone.to_scalar::<f64>().unwrap(), dice_ce);
}

#[test]
fn kd_loss_names_parse() {
    assert_eq!("mse".parse::<KdLoss>(), Ok(KdLoss::MseLogits));
    assert_eq!("mse_prob".parse::<KdLoss>(), Ok(KdLoss::MseProbabilities));
    assert_eq!("kl:2".parse::<KdLoss>(), Ok(KdLoss::Kl { temperature: 2.0 }));
    assert!("kl:-1".parse::<KdLoss>().unwrap_err().contains("positive"));
    assert!("l1".parse::<KdLoss>().unwrap_err().contains("not a KD loss"));
}

const CROP: [usize; 3] = [64, 32, 32];

fn student_metadata(spacing: f64) -> Metadata {
    Metadata { spacing: [spacing; 3], roi_size: CROP, ..Metadata::btcv("test_student", Config::tiny()) }
}

/// A 24 x 20 x 16 phantom-like case at 4 mm: a liver (6) and a spleen (1) block in fat.
fn small_case() -> Case {
    let dims = [24, 20, 16];
    let (mut image, mut labels) = (Vec::new(), Vec::new());
    for a in 0..dims[0] {
        for b in 0..dims[1] {
            for c in 0..dims[2] {
                let (hu, l) = if (3..12).contains(&a) && (4..15).contains(&b) && (3..12).contains(&c) {
                    (100.0, 6)
                } else if (15..20).contains(&a) && (6..11).contains(&b) && (5..10).contains(&c) {
                    (120.0, 1)
                } else {
                    (-100.0, 0)
                };
                image.push(hu + ((a * 7 + b * 3 + c) % 9) as f32);
                labels.push(l);
            }
        }
    }
    Case { name: "small".into(), image, labels, dims }
}

fn options(lambda: f64) -> DistillOptions {
    DistillOptions {
        lambda,
        crop: CROP,
        epochs: 3,
        warmup_epochs: 1,
        val_every: 1,
        seed: 11,
        ..DistillOptions::default()
    }
}

/// A student file with the same random weights the trainer starts from, to serve as the teacher.
fn twin_teacher(dir: &Path, spacing: f64) -> PathBuf {
    let path = dir.join(format!("twin_{spacing}.safetensors"));
    let weights = student_random_weights(&Config::tiny(), 3).unwrap();
    prosam_models::format::save(&path, student_metadata(spacing), &weights).unwrap();
    path
}

#[test]
fn the_teacher_sees_the_students_crop() {
    let dir = common::scratch_dir("distill_twin");
    let teacher = Teacher::load(&twin_teacher(&dir, 4.0), &Device::Cpu).unwrap();
    let weights = student_random_weights(&Config::tiny(), 3).unwrap();
    let mut trainer =
        StudentTrainer::new(student_metadata(4.0), weights, Some(teacher), options(1.0), &Device::Cpu).unwrap();
    // Student and teacher are one network with one intensity transform: on the same crop their
    // logits agree (up to the rounding of the teacher's fused inference kernels), so the first
    // step's loss (lambda 1: KD only) vanishes. A crop flipped or shifted for one of them would
    // not: an unrelated teacher on the same crop gives a loss of order 1e-3.
    let (loss, _) = trainer.train_epoch(&[small_case()], &mut |_, _, _| {}).unwrap();
    assert!(loss.abs() < 1e-8, "KD loss of a twin teacher: {loss}");
    let stranger = dir.join("stranger.safetensors");
    prosam_models::format::save(&stranger, student_metadata(4.0), &student_random_weights(&Config::tiny(), 4).unwrap())
        .unwrap();
    let stranger = Teacher::load(&stranger, &Device::Cpu).unwrap();
    let weights = student_random_weights(&Config::tiny(), 3).unwrap();
    let mut trainer =
        StudentTrainer::new(student_metadata(4.0), weights, Some(stranger), options(1.0), &Device::Cpu).unwrap();
    let (loss, _) = trainer.train_epoch(&[small_case()], &mut |_, _, _| {}).unwrap();
    assert!(loss > 1e-4, "KD loss of an unrelated teacher: {loss}");
}

#[test]
fn mismatched_teachers_are_refused_by_name() {
    let dir = common::scratch_dir("distill_mismatch");
    let weights = || student_random_weights(&Config::tiny(), 3).unwrap();
    let far = Teacher::load(&twin_teacher(&dir, 1.5), &Device::Cpu).unwrap();
    let err = StudentTrainer::new(student_metadata(4.0), weights(), Some(far), options(0.5), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("spacings must agree") && err.contains("[1.5, 1.5, 1.5]"), "{err}");
    let err = StudentTrainer::new(student_metadata(4.0), weights(), None, options(0.5), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("needs a teacher"), "{err}");
    let few = Config { out_channels: 3, ..Config::tiny() };
    let path = dir.join("few.safetensors");
    let few_meta = Metadata { spacing: [4.0; 3], roi_size: CROP, ..Metadata::btcv("few", few.clone()) };
    prosam_models::format::save(&path, few_meta, &student_random_weights(&few, 1).unwrap()).unwrap();
    let few = Teacher::load(&path, &Device::Cpu).unwrap();
    let err = StudentTrainer::new(student_metadata(4.0), weights(), Some(few), options(0.5), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("3 classes and the student 14"), "{err}");
}

#[test]
fn a_resumed_distillation_equals_an_uninterrupted_one() {
    let dir = common::scratch_dir("distill_student_resume");
    let teacher_path = dir.join("teacher.safetensors");
    prosam_models::format::save(
        &teacher_path,
        student_metadata(4.0),
        &student_random_weights(&Config::tiny(), 99).unwrap(),
    )
    .unwrap();
    let teacher = || Some(Teacher::load(&teacher_path, &Device::Cpu).unwrap());
    let start = || student_random_weights(&Config::tiny(), 5).unwrap();
    let cases = vec![small_case()];
    let mut straight =
        StudentTrainer::new(student_metadata(4.0), start(), teacher(), options(0.5), &Device::Cpu).unwrap();
    let mut losses = Vec::new();
    for _ in 0..2 {
        losses.push(straight.train_epoch(&cases, &mut |_, _, _| {}).unwrap().0);
    }
    let mut first = StudentTrainer::new(student_metadata(4.0), start(), teacher(), options(0.5), &Device::Cpu).unwrap();
    first.train_epoch(&cases, &mut |_, _, _| {}).unwrap();
    let ckpt = dir.join("last.safetensors");
    first.save_checkpoint(&ckpt).unwrap();
    drop(first);
    let mut resumed = StudentTrainer::resume(&ckpt, options(0.5), teacher(), &Device::Cpu).unwrap();
    assert_eq!(resumed.epoch, 1);
    let (loss, _) = resumed.train_epoch(&cases, &mut |_, _, _| {}).unwrap();
    assert_eq!(loss, losses[1]);
    for ((name, a), (_, b)) in straight.weights().iter().zip(&resumed.weights()) {
        assert!(values(a) == values(b), "`{name}` differs after resuming");
    }
    let v = resumed.validate(&cases).unwrap();
    assert!(v.dice.contains_key("liver") && v.nsd.contains_key("spleen"), "{v:?}");
    // Another teacher, or none, is refused.
    let err = StudentTrainer::resume(&ckpt, options(0.0), None, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("other options"), "{err}");
    let other = Teacher::load(&twin_teacher(&dir, 4.0), &Device::Cpu).unwrap();
    let err = StudentTrainer::resume(&ckpt, options(0.5), Some(other), &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("was taught by"), "{err}");
}

fn binary(name: &str) -> PathBuf {
    common::workspace_root().join("target/release").join(name)
}

#[test]
fn phantoms_distill_segment_and_evaluate_through_the_binaries() {
    let (prosam, distill) = (binary("prosam"), binary("prosam-distill"));
    if !prosam.is_file() || !distill.is_file() {
        panic!(
            "{} and {} are built by `cargo build --release --workspace` (the README's test command)",
            prosam.display(),
            distill.display()
        );
    }
    let dir = common::scratch_dir("distill_cli");
    let data = dir.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{cmd:?}:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    run(Command::new(&prosam)
        .args(["--quiet", "phantom", "--cases", "2", "--seed", "5", "--validation", "1"])
        .args(["--in-plane", "4,4", "--slice", "4,4", "--out"])
        .arg(&data));
    let dataset = Dataset::load(&data.join("dataset.json")).unwrap();
    assert_eq!((dataset.training.len(), dataset.validation.len()), (1, 1));
    assert_eq!(dataset.labels.as_ref().map(|l| l[&6].clone()), Some("liver".into()));
    // Phantoms load as training cases with every organ on the model grid.
    let case = load_case(&dataset.training[0], &student_metadata(4.0), None, None).unwrap();
    let mut present: Vec<u8> = case.labels.clone();
    present.sort();
    present.dedup();
    assert_eq!(present, (0..14).collect::<Vec<u8>>());

    let out = dir.join("run");
    let _ = std::fs::remove_dir_all(&out);
    let distill_args =
        ["--quiet", "--threads", "2", "distill", "--lambda", "0", "--student", "tiny", "--crop", "64,32,32"];
    // The demo student's options: crops centred class by class, class-weighted cross-entropy.
    run(Command::new(&distill)
        .args(distill_args)
        .args(["--spacing", "4,4,4", "--epochs", "1", "--crop-sampling", "classes", "--ce-weight", "inverse_sqrt"])
        .arg("--data")
        .arg(data.join("dataset.json"))
        .arg("--out")
        .arg(&out));
    let refused = Command::new(&distill)
        .args(distill_args)
        .args(["--spacing", "4,4,4", "--ce-weight", "1,2", "--data"])
        .arg(data.join("dataset.json"))
        .arg("--out")
        .arg(dir.join("refused"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("14 classes"), "{err}");
    // A resumed run keeps its class weights: other ones are refused, the same ones (recomputed
    // from the labels, read back bit-equal from the checkpoint) continue it.
    let resume = |weights: &str| {
        let mut cmd = Command::new(&distill);
        cmd.args(distill_args)
            .args(["--spacing", "4,4,4", "--epochs", "2", "--crop-sampling", "classes", "--ce-weight", weights])
            .arg("--data")
            .arg(data.join("dataset.json"))
            .arg("--out")
            .arg(&out)
            .arg("--resume");
        cmd
    };
    let other_weights = resume("none").output().unwrap();
    let err = String::from_utf8_lossy(&other_weights.stderr);
    assert!(!other_weights.status.success() && err.contains("class weights"), "{err}");
    run(&mut resume("inverse_sqrt"));
    // The teacher takes the same options (a 32^3 crop keeps the run short), and resumes too.
    let teacher_run = |epochs: &str, resume: bool| {
        let mut cmd = Command::new(&distill);
        cmd.args(["--quiet", "--threads", "2", "train-teacher", "--preset", "tiny", "--crop", "32"])
            .args(["--spacing", "4,4,4", "--warmup-epochs", "0", "--epochs", epochs])
            .args(["--crop-sampling", "classes", "--ce-weight", "inverse_sqrt", "--data"])
            .arg(data.join("dataset.json"))
            .arg("--out")
            .arg(dir.join("teacher"));
        if resume {
            cmd.arg("--resume");
        }
        cmd
    };
    let _ = std::fs::remove_dir_all(dir.join("teacher"));
    run(&mut teacher_run("1", false));
    run(&mut teacher_run("2", true));
    let teacher_log = std::fs::read_to_string(dir.join("teacher/log.jsonl")).unwrap();
    assert_eq!(teacher_log.lines().count(), 2, "{teacher_log}");
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2, "one line per epoch, the resumed one included: {log}");
    let record: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert!(record["mean_nsd"].is_number() && record["dice"].is_object(), "{record}");
    let student = out.join("student.safetensors");
    // The student carries its data's provenance; `provenance` copies it with an intended use,
    // the weights (checksum) unchanged, and never over its input.
    let info = |model: &Path| -> serde_json::Value {
        serde_json::from_str(&run(Command::new(&prosam).args(["info", "--json", "-m"]).arg(model))).unwrap()
    };
    let meta = info(&student)["metadata"].clone();
    assert!(meta["training_data"].as_str().unwrap().starts_with("prosam phantoms: "), "{meta}");
    assert!(meta["licence"].as_str().unwrap().contains("Apache-2.0"), "{meta}");
    let copy = dir.join("stamped.safetensors");
    let provenance = |output: &Path| {
        let mut cmd = Command::new(&distill);
        cmd.args(["provenance", "--intended-use", "tests only", "--name", "stamped", "-m"])
            .arg(&student)
            .arg("--data")
            .arg(data.join("dataset.json"))
            .arg("-o")
            .arg(output);
        cmd
    };
    run(&mut provenance(&copy));
    let stamped = info(&copy)["metadata"].clone();
    assert_eq!((stamped["intended_use"].as_str(), stamped["name"].as_str()), (Some("tests only"), Some("stamped")));
    assert_eq!(stamped["checksum"], meta["checksum"]);
    let refused = provenance(&student).output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("refusing to overwrite"), "{err}");
    let seg = dir.join("seg.nii.gz");
    let image = &dataset.validation[0].image;
    run(Command::new(&prosam)
        .args(["--quiet", "segment", "-m"])
        .arg(&student)
        .arg("-i")
        .arg(image)
        .arg("-o")
        .arg(&seg));
    let report = run(Command::new(&prosam)
        .args(["eval", "--json", "--pred"])
        .arg(&seg)
        .arg("--truth")
        .arg(&dataset.validation[0].label));
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(report["organs"]["liver"]["truth_voxels"].as_u64().unwrap() > 1000, "{report}");
    assert_eq!(report["dice"].as_object().unwrap().len(), 13, "every organ of the phantom is scored: {report}");
    // A label map against the wrong grid is refused, naming both files.
    run(Command::new(&prosam)
        .args(["--quiet", "phantom", "--cases", "1", "--seed", "9", "--in-plane", "5,5", "--slice", "5,5", "--out"])
        .arg(dir.join("other")));
    let bad = Command::new(&prosam)
        .args(["eval", "--pred"])
        .arg(&seg)
        .arg("--truth")
        .arg(dir.join("other/labelsTr/phantom_00009.nii.gz"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("must share a grid") && err.contains("phantom_00009"), "{err}");
}
