//! The training crate: the loss against a naive f64 reference with its gradient, AdamW and the
//! schedule against PyTorch's formulas, the stages' trainable sets, exact resumption, and clear
//! errors for bad datasets and checkpoints.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use prosam_distill::data::{Dataset, LabelMap, load_case};
use prosam_distill::loss::{dice_ce, dice_ce_weighted, inverse_sqrt_frequency_weights};
use prosam_distill::optim::{AdamW, AdamWConfig, learning_rate};
use prosam_distill::teacher::{Init, TeacherTrainer, TrainOptions, initial_weights, random_weights};
use prosam_models::autoprosam::Config;
use prosam_models::format::Metadata;

fn small_metadata() -> Metadata {
    Metadata { spacing: [2.0, 2.0, 2.0], ..Metadata::teacher("small", Config::micro()) }
}

const AFFINE: [[f32; 4]; 3] = [[2.0, 0.0, 0.0, -20.0], [0.0, 2.0, 0.0, -20.0], [0.0, 0.0, 2.0, -20.0]];

/// A 20^3 CT at 2 mm of a sphere (label 1, 60 HU) and a box (label 2, 200 HU) in fat (-100 HU),
/// and its labels; returns the folder's dataset.json.
fn synthetic_dataset(dir: &Path) -> PathBuf {
    let dims = [20, 20, 20];
    let (mut ct, mut seg) = (Vec::new(), Vec::new());
    for k in 0..20 {
        for j in 0..20 {
            for i in 0..20 {
                let r2 = (i as f32 - 7.0).powi(2) + (j as f32 - 9.0).powi(2) + (k as f32 - 10.0).powi(2);
                let (hu, label) = if r2 < 16.0 {
                    (60.0, 1.0)
                } else if (12..17).contains(&i) && (4..9).contains(&j) && (8..15).contains(&k) {
                    (200.0, 2.0)
                } else {
                    (-100.0, 0.0)
                };
                ct.push(hu + ((i * 7 + j * 3 + k) % 5) as f32);
                seg.push(label);
            }
        }
    }
    common::write_nifti_f32(&dir.join("ct.nii"), dims, &ct, AFFINE);
    common::write_nifti_f32(&dir.join("seg.nii"), dims, &seg, AFFINE);
    let json = r#"{"training": [{"image": "ct.nii", "label": "seg.nii"}], "validation": [{"image": "ct.nii", "label": "seg.nii"}]}"#;
    std::fs::write(dir.join("dataset.json"), json).unwrap();
    dir.join("dataset.json")
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// MONAI's DiceCELoss written out in f64 loops.
fn dice_ce_reference(logits: &[f64], labels: &[u32], classes: usize, lambda: (f64, f64)) -> f64 {
    dice_ce_weighted_reference(logits, labels, classes, lambda, &vec![1.0; classes])
}

/// The same with PyTorch's class-weighted cross-entropy: `sum w[y] nll / sum w[y]`.
fn dice_ce_weighted_reference(
    logits: &[f64],
    labels: &[u32],
    classes: usize,
    lambda: (f64, f64),
    weight: &[f64],
) -> f64 {
    let n = labels.len();
    let mut p = vec![0.0; classes * n];
    let (mut ce, mut weights) = (0.0, 0.0);
    for v in 0..n {
        let max = (0..classes).map(|c| logits[c * n + v]).fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = (0..classes).map(|c| (logits[c * n + v] - max).exp()).sum();
        for c in 0..classes {
            p[c * n + v] = (logits[c * n + v] - max).exp() / sum;
        }
        let w = weight[labels[v] as usize];
        ce -= w * ((logits[labels[v] as usize * n + v] - max) - sum.ln());
        weights += w;
    }
    let mut dice = 0.0;
    for c in 0..classes {
        let (mut i, mut ps, mut gs) = (0.0, 0.0, 0.0);
        for v in 0..n {
            let g = (labels[v] as usize == c) as u8 as f64;
            i += p[c * n + v] * g;
            ps += p[c * n + v];
            gs += g;
        }
        dice += 1.0 - (2.0 * i + 1e-5) / (ps + gs + 1e-5);
    }
    lambda.0 * dice / classes as f64 + lambda.1 * ce / weights
}

/// `grad[i]` of `loss` at `logits` against central differences, at `indices`.
fn assert_central_differences(grad: &[f64], logits: &[f64], indices: &[usize], loss: impl Fn(&[f64]) -> f64) {
    let h = 1e-6;
    for &i in indices {
        let at = |d: f64| {
            let mut l = logits.to_vec();
            l[i] += d;
            loss(&l)
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        assert!((fd - grad[i]).abs() < 1e-7, "d/dlogit[{i}]: {} vs {fd}", grad[i]);
    }
}

#[test]
fn dice_ce_matches_reference_and_its_gradient() {
    let shape = [1, 4, 3, 2, 5];
    let n = 30;
    let logits: Vec<f64> = (0..4 * n).map(|i| ((i * 37 % 23) as f64 / 7.0 - 1.5) * 0.8).collect();
    // Class 3 is absent from the labels: its Dice term is then the smoothing's.
    let labels: Vec<u32> = (0..n).map(|i| (i * 5 % 7 % 3) as u32).collect();
    let y = Tensor::from_vec(labels.clone(), (1, 3, 2, 5), &Device::Cpu).unwrap();
    let var = Var::from_vec(logits.clone(), shape.to_vec(), &Device::Cpu).unwrap();
    let loss = dice_ce(var.as_tensor(), &y, 0.5, 0.5).unwrap();
    let want = dice_ce_reference(&logits, &labels, 4, (0.5, 0.5));
    assert!((loss.to_scalar::<f64>().unwrap() - want).abs() < 1e-12, "{loss} vs {want}");
    let grad = values(loss.backward().unwrap().get(var.as_tensor()).unwrap());
    assert_central_differences(&grad, &logits, &[0, 7, 31, 64, 119], |l| dice_ce_reference(l, &labels, 4, (0.5, 0.5)));
    // f32 agrees with f64.
    let f32_loss = dice_ce(&var.as_tensor().to_dtype(DType::F32).unwrap(), &y, 0.5, 0.5).unwrap();
    assert!((f32_loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-5);
}

#[test]
fn class_weighted_dice_ce_matches_reference_and_its_gradient() {
    let shape = [1, 4, 3, 2, 5];
    let n = 30;
    let logits: Vec<f64> = (0..4 * n).map(|i| ((i * 29 % 19) as f64 / 6.0 - 1.4) * 0.9).collect();
    let labels: Vec<u32> = (0..n).map(|i| (i * 5 % 7 % 4) as u32).collect();
    let counts: Vec<u64> = (0..4).map(|c| labels.iter().filter(|&&l| l == c).count() as u64).collect();
    let weight = inverse_sqrt_frequency_weights(&counts);
    // 1 / sqrt(share): the rarest class weighs the most.
    for (c, &k) in counts.iter().enumerate() {
        assert!((weight[c] - (n as f64 / k as f64).sqrt()).abs() < 1e-12);
    }
    assert_eq!(inverse_sqrt_frequency_weights(&[3, 0, 1])[1], 0.0);
    let y = Tensor::from_vec(labels.clone(), (1, 3, 2, 5), &Device::Cpu).unwrap();
    let w = Tensor::new(weight.as_slice(), &Device::Cpu).unwrap();
    let var = Var::from_vec(logits.clone(), shape.to_vec(), &Device::Cpu).unwrap();
    let loss = dice_ce_weighted(var.as_tensor(), &y, 0.5, 0.5, Some(&w)).unwrap();
    let want = dice_ce_weighted_reference(&logits, &labels, 4, (0.5, 0.5), &weight);
    assert!((loss.to_scalar::<f64>().unwrap() - want).abs() < 1e-12, "{loss} vs {want}");
    // The weights change the loss: not the unweighted one by accident.
    assert!((want - dice_ce_reference(&logits, &labels, 4, (0.5, 0.5))).abs() > 1e-3);
    let grad = values(loss.backward().unwrap().get(var.as_tensor()).unwrap());
    assert_central_differences(&grad, &logits, &[0, 11, 45, 77, 118], |l| {
        dice_ce_weighted_reference(l, &labels, 4, (0.5, 0.5), &weight)
    });
    // f32 (training's type) agrees with f64.
    let f32_logits = var.as_tensor().to_dtype(DType::F32).unwrap();
    let f32_loss = dice_ce_weighted(&f32_logits, &y, 0.5, 0.5, Some(&w.to_dtype(DType::F32).unwrap())).unwrap();
    assert!((f32_loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-5);
    let wrong = Tensor::new(&[1.0f64, 2.0, 3.0], &Device::Cpu).unwrap();
    assert!(dice_ce_weighted(var.as_tensor(), &y, 0.5, 0.5, Some(&wrong)).is_err());
}

#[test]
fn adamw_clips_per_group_and_follows_pytorch() {
    let a = Var::from_vec(vec![1.0f64, -2.0], 2, &Device::Cpu).unwrap();
    let b = Var::from_vec(vec![0.5f64], 1, &Device::Cpu).unwrap();
    let cfg = AdamWConfig { lr: 0.1, weight_decay: 0.01, ..Default::default() };
    let mut opt =
        AdamW::new(vec![("a".into(), vec![("a".into(), a.clone())]), ("b".into(), vec![("b".into(), b.clone())])], cfg)
            .unwrap();
    // Gradients 2 * (3, 4) (norm 10, clipped to 1) and 2 * 0.25 (norm 0.5, not clipped).
    let loss = |sa: [f64; 2], sb: f64| {
        let l = (a.as_tensor() * Tensor::new(&[2.0 * sa[0], 2.0 * sa[1]], &Device::Cpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        (l + (b.as_tensor() * (2.0 * sb)).unwrap().sum_all().unwrap()).unwrap()
    };
    let report = opt.step(&loss([3.0, 4.0], 0.25).backward().unwrap(), Some(1.0)).unwrap();
    assert!((report.grad_norms[0] - 10.0).abs() < 1e-12 && (report.grad_norms[1] - 0.5).abs() < 1e-12);
    // PyTorch's AdamW, step by step, in f64.
    let reference = |p0: f64, grads: &[f64]| {
        let (b1, b2, eps, lr, wd) = (0.9f64, 0.999f64, 1e-8, 0.1, 0.01);
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (t, &g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            p *= 1.0 - lr * wd;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            p -= lr / (1.0 - b1.powi(t)) * m / (v.sqrt() / (1.0 - b2.powi(t)).sqrt() + eps);
        }
        p
    };
    let clip = 1.0 / (10.0 + 1e-6);
    let got = values(a.as_tensor());
    assert!((got[0] - reference(1.0, &[6.0 * clip])).abs() < 1e-12, "{got:?}");
    assert!((got[1] - reference(-2.0, &[8.0 * clip])).abs() < 1e-12);
    assert!((values(b.as_tensor())[0] - reference(0.5, &[0.5])).abs() < 1e-12);
    // A second step, without clipping, then the state through save and restore.
    opt.step(&loss([-1.0, 0.5], 0.1).backward().unwrap(), None).unwrap();
    assert!((values(a.as_tensor())[0] - reference(1.0, &[6.0 * clip, -2.0])).abs() < 1e-12);
    let (tensors, steps) = opt.state();
    assert_eq!(steps, vec![("a".to_string(), 2), ("b".to_string(), 2)]);
    let mut restored =
        AdamW::new(vec![("a".into(), vec![("a".into(), a.clone())]), ("b".into(), vec![("b".into(), b.clone())])], cfg)
            .unwrap();
    restored.load_state(&tensors.into_iter().collect(), &steps).unwrap();
    restored.step(&loss([0.3, 0.3], 0.3).backward().unwrap(), None).unwrap();
    assert!((values(a.as_tensor())[0] - reference(1.0, &[6.0 * clip, -2.0, 0.6])).abs() < 1e-12);
}

#[test]
#[allow(clippy::approx_constant)] // the reference writes 2.718
fn schedule_is_the_reference_code() {
    assert!((learning_rate(5e-4, 0, 5, 400) - 5e-4 * 2.718f64.powf(-10.0)).abs() < 1e-15);
    assert!((learning_rate(5e-4, 0, 5, 400) - 2.27e-8).abs() < 1e-10, "about 2.3e-8 at epoch 0");
    assert!((learning_rate(5e-4, 5, 5, 400) - 5e-4).abs() < 1e-15);
    assert!((learning_rate(5e-4, 6, 5, 400) - 5e-4 * (1.0f64 - 6.0 / 400.0).powf(0.9)).abs() < 1e-15);
    assert_eq!(learning_rate(5e-4, 400, 5, 400), 0.0);
}

/// Random weights with every value off its initial constant, so that every unit of the small
/// network is alive (on PyTorch's init some of its ReLUs are dead on a given crop, and a dead unit
/// gets no gradient).
fn lively_weights(cfg: &Config, seed: u64) -> Vec<(String, Tensor)> {
    let mut state = seed;
    let mut uniform = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    cfg.parameter_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let fan_in = shape.iter().skip(1).product::<usize>().max(1) as f64;
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    let u = uniform();
                    (if name.ends_with("norm1.weight") || name.ends_with("norm2.weight") || name.ends_with("attn.lr") {
                        1.0 + 0.3 * u
                    } else if name.ends_with("bias") || name.contains("embed") || name.contains("rel_pos") {
                        0.5 * u
                    } else {
                        u * (3.0 / fan_in).sqrt()
                    }) as f32
                })
                .collect();
            (name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
        })
        .collect()
}

fn trainer(stage: u8, seed: u64) -> TeacherTrainer {
    let options =
        TrainOptions { stage, epochs: 4, warmup_epochs: 0, lr: 1e-3, samples_per_case: 2, ..Default::default() };
    let weights = lively_weights(&Config::micro(), seed);
    TeacherTrainer::new(small_metadata(), weights, options, &Device::Cpu).unwrap()
}

/// A 16^3 crop of uniform noise in [-1, 1) with labels by value (the three classes about equally
/// often): every unit of the micro network sees varied input.
fn noisy_crop(seed: u64) -> (Vec<f32>, Vec<u8>) {
    let mut rng = prosam_distill::rng::Rng::new(seed);
    let image: Vec<f32> = (0..16 * 16 * 16).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect();
    let labels = image
        .iter()
        .map(|&v| {
            if v > 0.33 {
                1
            } else if v < -0.33 {
                2
            } else {
                0
            }
        })
        .collect();
    (image, labels)
}

#[test]
fn one_step_moves_exactly_the_trainable_parameters() {
    for stage in [1, 2] {
        let mut t = trainer(stage, 3);
        let before: Vec<(String, Tensor)> = t.weights().into_iter().map(|(n, w)| (n, w.copy().unwrap())).collect();
        let (image, labels) = noisy_crop(11);
        t.step(&image, &labels, [16; 3]).unwrap();
        let after = t.weights();
        let (mut moved, mut frozen) = (0, 0);
        for ((name, b), (_, a)) in before.iter().zip(&after) {
            let changed = values(b) != values(a);
            if Config::trains_in_stage(name, stage) {
                assert!(changed, "stage {stage}: trainable `{name}` did not change");
                moved += 1;
            } else {
                assert!(!changed, "stage {stage}: frozen `{name}` changed");
                frozen += 1;
            }
        }
        eprintln!("stage {stage}: {moved} parameters moved, {frozen} stayed");
        assert!(moved > 0 && frozen > 0);
    }
}

#[test]
fn teacher_class_weights_enter_the_loss_and_are_checked() {
    let mut t = trainer(1, 5);
    let (image, labels) = noisy_crop(13);
    let plain = t.gradients(&image, &labels, [16; 3], false).unwrap().0;
    // Equal weights are the plain weighted mean; a skewed set changes the cross-entropy term.
    t.set_ce_weight(Some(vec![2.0; 3])).unwrap();
    let equal = t.gradients(&image, &labels, [16; 3], false).unwrap().0;
    assert!((plain - equal).abs() <= 1e-6 * plain.abs(), "{plain} vs {equal}");
    t.set_ce_weight(Some(vec![0.1, 1.0, 10.0])).unwrap();
    let (skewed, grads) = t.gradients(&image, &labels, [16; 3], false).unwrap();
    let (checkpointed, _) = t.gradients(&image, &labels, [16; 3], true).unwrap();
    assert!((skewed - plain).abs() > 1e-3 * plain.abs(), "{plain} vs {skewed}");
    assert!((skewed - checkpointed).abs() <= 1e-6 * skewed.abs(), "{skewed} vs {checkpointed}");
    assert!(t.optimizer_groups().iter().flatten().all(|(_, v)| grads.get(v.as_tensor()).is_some()));
    for bad in [vec![1.0, 1.0], vec![1.0, -1.0, 1.0], vec![0.0; 3], vec![1.0, f64::NAN, 1.0]] {
        let err = t.set_ce_weight(Some(bad.clone())).err().unwrap().to_string();
        assert!(err.contains("the teacher has 3 classes"), "{bad:?}: {err}");
    }
    assert_eq!(t.options.ce_weight, Some(vec![0.1, 1.0, 10.0]), "a refused set leaves the weights as they were");
}

#[test]
fn checkpointed_blocks_give_the_whole_graph_gradients() {
    let mut t = trainer(1, 8);
    let (image, labels) = noisy_crop(12);
    // Before training, and after two (checkpointed) steps: the graph-free forward pass must follow
    // the weights the optimizer updates.
    let mut losses = Vec::new();
    for round in 0..2 {
        let (loss_a, plain) = t.gradients(&image, &labels, [16; 3], false).unwrap();
        let (loss_b, checkpointed) = t.gradients(&image, &labels, [16; 3], true).unwrap();
        // The graph-free blocks take the inference kernels (layer norm with f64 statistics), the
        // recorded ones Candle's composed ops: the losses may differ in the last bits, where stale
        // weights would move them by orders of magnitude more (checked below).
        eprintln!("round {round}: loss {loss_a} plain, {loss_b} checkpointed");
        assert!((loss_a - loss_b).abs() <= 1e-6 * loss_a.abs(), "round {round}: {loss_a} vs {loss_b}");
        losses.push(loss_a);
        let mut compared = 0;
        for group in t.optimizer_groups() {
            for (name, var) in group {
                let (a, b) = (plain.get(var.as_tensor()), checkpointed.get(var.as_tensor()));
                let (Some(a), Some(b)) = (a, b) else { panic!("`{name}`: a gradient in one pass only") };
                let (a, b) = (values(a), values(b));
                let scale = a.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
                let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale;
                assert!(err < 1e-4, "round {round}, `{name}`: checkpointed gradient differs by {err:e} (relative)");
                compared += 1;
            }
        }
        assert!(compared > 50, "{compared} parameters compared");
        for _ in 0..2 {
            t.step(&image, &labels, [16; 3]).unwrap();
        }
    }
    // Two steps move the loss far beyond the tolerance above, so a stale copy would be caught.
    assert!((losses[0] - losses[1]).abs() > 1e-3 * losses[0].abs(), "{losses:?}");
}

#[test]
fn a_resumed_run_equals_an_uninterrupted_one() {
    let dir = common::scratch_dir("distill_resume");
    let dataset = Dataset::load(&synthetic_dataset(&dir)).unwrap();
    let case = load_case(&dataset.training[0], &small_metadata(), None, Some(&dir.join("cache"))).unwrap();
    assert_eq!(case.dims, [20, 20, 20]);
    // The second load comes from the cache and is the same.
    let cached = load_case(&dataset.training[0], &small_metadata(), None, Some(&dir.join("cache"))).unwrap();
    assert!(cached.image == case.image && cached.labels == case.labels);
    let cases = vec![case];

    let mut straight = trainer(1, 5);
    for _ in 0..2 {
        straight.train_epoch(&cases, &mut |_, _, _| {}).unwrap();
    }
    let mut first = trainer(1, 5);
    first.train_epoch(&cases, &mut |_, _, _| {}).unwrap();
    let ckpt = dir.join("last.safetensors");
    first.save_checkpoint(&ckpt).unwrap();
    drop(first);
    let mut resumed = TeacherTrainer::resume(&ckpt, straight.options.clone(), &Device::Cpu).unwrap();
    assert_eq!(resumed.epoch, 1);
    resumed.train_epoch(&cases, &mut |_, _, _| {}).unwrap();
    for ((name, a), (_, b)) in straight.weights().iter().zip(&resumed.weights()) {
        assert!(values(a) == values(b), "`{name}` differs after resuming");
    }
    let v = resumed.validate(&cases).unwrap();
    assert!(v.dice.contains_key("label_1") && v.mean_dice.is_finite() && v.nsd.contains_key("label_1"), "{v:?}");

    // Other options than the checkpoint's are refused, by name.
    let other = TrainOptions { lr: 0.1, ..straight.options.clone() };
    let err = TeacherTrainer::resume(&ckpt, other, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("other options"), "{err}");
}

#[test]
fn bad_datasets_and_checkpoints_are_named() {
    let dir = common::scratch_dir("distill_bad_data");
    synthetic_dataset(&dir);
    let write = |name: &str, json: &str| {
        let p = dir.join(name);
        std::fs::write(&p, json).unwrap();
        p
    };
    let err = |p: &Path| Dataset::load(p).err().map(|e| e.to_string()).unwrap_or_default();
    let missing = write("missing.json", r#"{"training": [{"image": "ct.nii", "label": "nope.nii"}]}"#);
    let e = err(&missing);
    assert!(e.contains("training[0].label") && e.contains("nope.nii") && e.contains("does not exist"), "{e}");
    let empty = write("empty.json", r#"{"validation": []}"#);
    assert!(err(&empty).contains("`training` list is missing or empty"));

    let meta = small_metadata();
    let case_error = |image: &[f32], dims: [usize; 3], affine: [[f32; 4]; 3], label_map: Option<&LabelMap>| {
        common::write_nifti_f32(&dir.join("other.nii"), dims, image, affine);
        let json = write("pair.json", r#"{"training": [{"image": "ct.nii", "label": "other.nii"}]}"#);
        let ds = Dataset::load(&json).unwrap();
        load_case(&ds.training[0], &meta, label_map, None).err().unwrap().to_string()
    };
    let e = case_error(&vec![0.0; 8000 - 400], [20, 20, 19], AFFINE, None);
    assert!(e.contains("shape [20, 20, 19]") && e.contains("[20, 20, 20]"), "{e}");
    let mut shifted = AFFINE;
    shifted[0][3] += 1.0;
    let e = case_error(&vec![0.0; 8000], [20, 20, 20], shifted, None);
    assert!(e.contains("affine differs") && e.contains("1.0000 mm"), "{e}");
    let mut outside = vec![0.0; 8000];
    outside[5] = 7.0;
    outside[6] = 9.0;
    let e = case_error(&outside, [20, 20, 20], AFFINE, None);
    assert!(e.contains("label 7 (1 voxels, and 1 other values) is outside the model's 3 classes"), "{e}");
    // A label map renumbers first: 7 -> 2 is fine, 9 becomes background.
    let map = LabelMap::new([(7, 2)].into());
    let json = write("pair.json", r#"{"training": [{"image": "ct.nii", "label": "other.nii"}]}"#);
    let case = load_case(&Dataset::load(&json).unwrap().training[0], &meta, Some(&map), None).unwrap();
    assert_eq!(case.labels.iter().filter(|&&l| l == 2).count(), 1);

    // A teacher file of another configuration.
    let other_cfg = Config { decoder_channels: 4, ..Config::micro() };
    let file = dir.join("other_teacher.safetensors");
    prosam_models::format::save(
        &file,
        Metadata::teacher("o", other_cfg.clone()),
        &random_weights(&other_cfg, 1).unwrap(),
    )
    .unwrap();
    let e = initial_weights(&Config::micro(), &Init::File(file)).err().unwrap().to_string();
    assert!(e.contains("a teacher of another configuration"), "{e}");
}

/// The spec's example tiny configuration, which `../shared/fixtures/sam/sam_vit_tiny.pth` fits:
/// SAM img_size 128, window 4, global attention in block 1, two blocks.
fn sam_tiny_config() -> Config {
    Config {
        depth: 2,
        sam_img_size: 128,
        sam_window: 4,
        global_attn_indexes: vec![1],
        taps: [1, 1, 2, 2],
        ..Config::tiny()
    }
}

#[test]
fn sam_checkpoint_initialises_the_backbone() {
    let Some(sam) = common::shared_file("fixtures/sam/sam_vit_tiny.pth") else { return };
    let cfg = sam_tiny_config();
    let weights = initial_weights(&cfg, &Init::Sam(sam.clone(), 1)).unwrap();
    let stored: std::collections::HashMap<String, Tensor> =
        candle_core::pickle::read_all(&sam).unwrap().into_iter().collect();
    let get = |name: &str| weights.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone()).unwrap();
    for (teacher, file) in [
        ("encoder.blocks.1.attn.qkv.weight", "image_encoder.blocks.1.attn.qkv.weight"),
        ("encoder.blocks.0.norm1.weight", "image_encoder.blocks.0.norm1.weight"),
        ("encoder.pos_embed", "image_encoder.pos_embed"),
        ("encoder.patch_embed.proj.weight", "image_encoder.patch_embed.proj.weight"),
    ] {
        assert!(values(&get(teacher)) == values(&stored[file]), "{teacher} is not SAM's {file}");
    }
    for block in 0..2 {
        let t = |n: &str| values(&get(&format!("encoder.blocks.{block}.attn.{n}")));
        let (h, w, d) = (t("rel_pos_h"), t("rel_pos_w"), t("rel_pos_d"));
        assert!(d.iter().zip(h.iter().zip(&w)).all(|(d, (h, w))| (d - 0.5 * (h + w)).abs() < 1e-7));
        assert_eq!(t("lr"), vec![1.0]);
    }
    // The network it makes runs; a ViT-B teacher does not fit a tiny SAM, and says so.
    let vb = candle_nn::VarBuilder::from_tensors(weights.into_iter().collect(), DType::F32, &Device::Cpu);
    let net = prosam_models::autoprosam::AutoProSam::new(&cfg, vb).unwrap();
    let logits = net.forward_checked(&Tensor::zeros((1, 1, 32, 32, 32), DType::F32, &Device::Cpu).unwrap()).unwrap();
    assert_eq!(logits.dims(), [1, 14, 32, 32, 32]);
    let e = initial_weights(&Config::vit_b(), &Init::Sam(sam, 1)).err().unwrap().to_string();
    assert!(e.contains("a SAM of another size") && e.contains("image_encoder.pos_embed"), "{e}");
}
