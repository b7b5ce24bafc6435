//! The table of figures against ceilings, and the latency chart.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::Figures;

/// CPU microseconds per vote of the pipeline end to end, summed over ingest, nats-server, the
/// workers and PostgreSQL, and the same for the ceilings' unavoidable work.
pub fn cpu_per_vote(f: &Figures) -> (f64, f64) {
    let e2e = &f.end_to_end.measured;
    let system = ["ingest", "nats-server", "worker", "postgres"]
        .into_iter()
        .map(|group| e2e.cpu_us(group))
        .sum();
    let ceilings = f.null_http.cpu_us("null server")
        + f.raw_batch.total_cpu_us()
        + f.raw_fetch_ack.total_cpu_us()
        + f.raw_sql.total_cpu_us();
    (system, ceilings)
}

/// The rate at which `f.cores` cores are used up by the CPU per operation of several ceilings
/// together: what one stage could reach if nothing but the ceilings' own work ran.
fn composed(f: &Figures, parts: &[&crate::Measured]) -> f64 {
    let us: f64 = parts.iter().map(|m| m.total_cpu_us()).sum();
    f.cores as f64 * 1e6 / us.max(f64::MIN_POSITIVE)
}

pub fn table(f: &Figures) -> String {
    let mut out = String::new();
    let mb = |bytes: u64| bytes as f64 / 1_048_576.0;
    let _ = writeln!(out, "| figure | measured | ceiling | ratio | target |");
    let _ = writeln!(out, "|---|---:|---:|---:|---|");
    let mut row = |name: &str, value: f64, ceiling: Option<f64>, target: &str, unit: &str| {
        let (ceiling_text, ratio) = match ceiling {
            Some(c) => (format!("{c:.0} {unit}"), format!("{:.2}", value / c)),
            None => (String::new(), String::new()),
        };
        let _ = writeln!(
            out,
            "| {name} | {value:.0} {unit} | {ceiling_text} | {ratio} | {target} |"
        );
    };
    row(
        "ingest, one node at saturation, fsync before ack vs the same with lazy sync",
        f.ingest.rate,
        Some(f.ingest_lazy.rate),
        "≥ 0.8",
        "/s",
    );
    row(
        "ingest, one node at saturation, on a three-node R3 cluster vs on one server (R1), all on these cores",
        f.ingest_r3.rate,
        Some(f.ingest.rate),
        "≥ 0.6",
        "/s",
    );
    row(
        &format!(
            "three ingest nodes on a three-node R3 cluster, each nats-server held to {:.2} of a core: K = 3 vote partitions vs K = 1",
            f.nats_core_share
        ),
        f.partitions_three.rate,
        Some(f.partitions_one.rate),
        "≥ 2.5",
        "/s",
    );
    row(
        "ingest vs its composed ceiling: null handler with its load generator + raw atomic batches, on these cores",
        f.ingest.rate,
        Some(composed(f, &[&f.null_http, &f.raw_batch])),
        "≥ 0.7",
        "/s",
    );
    row(
        "ingest CPU per vote vs the null handler's per request + the raw batch publisher's per message (µs)",
        f.ingest.cpu_us("ingest"),
        Some(f.null_http.cpu_us("null server") + f.raw_batch.cpu_us("bench")),
        "≤ 1.3",
        "µs",
    );
    row(
        "nats-server CPU per accepted vote vs per message of raw single publishes (µs, fsync)",
        f.ingest.cpu_us("nats-server"),
        Some(f.raw_publish.cpu_us("nats-server")),
        "≤ 1",
        "µs",
    );
    row(
        "raw atomic batches of 1000 vs raw single publishes (msg/s, fsync before ack)",
        f.raw_batch.rate,
        Some(f.raw_publish.rate),
        "",
        "/s",
    );
    row(
        "raw single publishes with a message id vs without (msg/s, lazy sync): the duplicate window",
        f.raw_publish_lazy_ids.rate,
        Some(f.raw_publish_lazy.rate),
        "",
        "/s",
    );
    row(
        "nats-server CPU per publish with a message id vs without (µs, lazy sync)",
        f.raw_publish_lazy_ids.cpu_us("nats-server"),
        Some(f.raw_publish_lazy.cpu_us("nats-server")),
        "",
        "µs",
    );
    row(
        "one worker's drain rate vs raw SQL",
        f.drain_one.rate,
        Some(f.raw_sql.rate),
        "≥ 0.6",
        "/s",
    );
    row(
        "one worker vs its composed ceiling: raw SQL + raw fetch-and-ack, on these cores",
        f.drain_one.rate,
        Some(composed(f, &[&f.raw_sql, &f.raw_fetch_ack])),
        "",
        "/s",
    );
    row(
        "two workers' drain rate vs raw SQL",
        f.drain_two.rate,
        Some(f.raw_sql.rate),
        "",
        "/s",
    );
    row(
        "HTTP ceiling: null handler",
        f.null_http.rate,
        None,
        "",
        "/s",
    );
    row(
        "raw fetch-and-ack ceiling",
        f.raw_fetch_ack.rate,
        None,
        "",
        "/s",
    );
    let (system, ceilings) = cpu_per_vote(f);
    let e2e = &f.end_to_end;
    let tally = match e2e.tally_exact {
        Some(true) => "tally exact",
        Some(false) => "tally NOT EXACT",
        None => "tally not checked: some votes failed",
    };
    row(
        &format!(
            "end to end: {} votes ({} voters, {} changed their minds) through 2 ingest nodes and 2 workers, until nothing pending",
            e2e.voted.accepted, e2e.voted.voters, e2e.voted.changed
        ),
        e2e.measured.rate,
        None,
        tally,
        "/s",
    );
    row(
        "CPU per vote end to end, ingest + nats-server + worker + PostgreSQL (µs)",
        system,
        Some(ceilings),
        "≤ 1.3",
        "µs",
    );
    if let Some(half) = f.ingest_latency.iter().find(|p| is_half(p, f)) {
        let null = f
            .null_latency
            .iter()
            .find(|p| p.offered == half.offered)
            .map_or(f64::NAN, |p| p.p99_ms);
        let _ = writeln!(
            out,
            "| p99 ingest latency at half of saturation (fsync before ack) vs the null handler's at that rate | {:.2} ms | {null:.2} ms | {:.2} | ≤ 2 |",
            half.p99_ms,
            half.p99_ms / null
        );
    }
    let _ = writeln!(
        out,
        "| ingest RSS with {} idle keep-alive connections vs the null handler's | {:.1} MB | {:.1} MB | {:.2} | ≤ 100 MB with 10,000 connections |",
        f.idle.connections,
        mb(f.idle.ingest_rss),
        mb(f.idle.null_rss),
        f.idle.ingest_rss as f64 / f.idle.null_rss.max(1) as f64
    );
    let _ = writeln!(
        out,
        "| ingest peak RSS (every run) | {:.1} MB | | | |",
        mb(f.ingest_peak_rss)
    );
    let _ = writeln!(
        out,
        "| worker peak RSS | {:.1} MB | | | ≤ 64 MB |",
        mb(f.worker_peak_rss)
    );

    let _ = writeln!(out, "\nCPU µs per operation, by process:\n");
    let _ = writeln!(out, "| stage | ops | ops/s | CPU µs per op |");
    let _ = writeln!(out, "|---|---:|---:|---|");
    for (name, m) in [
        ("null HTTP handler (ceiling)", &f.null_http),
        ("raw single publish, fsync (ceiling)", &f.raw_publish),
        ("raw atomic batches of 1000, fsync (ceiling)", &f.raw_batch),
        ("raw single publish, lazy sync", &f.raw_publish_lazy),
        (
            "raw single publish with message ids, lazy sync",
            &f.raw_publish_lazy_ids,
        ),
        ("raw fetch-and-ack (ceiling)", &f.raw_fetch_ack),
        ("raw SQL, rows (ceiling)", &f.raw_sql),
        ("ingest at saturation, fsync", &f.ingest),
        ("ingest at saturation, lazy sync", &f.ingest_lazy),
        ("ingest at saturation, R3 cluster", &f.ingest_r3),
        (
            "3 ingest nodes, capped R3 cluster, K = 1",
            &f.partitions_one,
        ),
        (
            "3 ingest nodes, capped R3 cluster, K = 3",
            &f.partitions_three,
        ),
        ("drain, one worker", &f.drain_one),
        ("drain, two workers", &f.drain_two),
        ("end to end (per accepted vote)", &f.end_to_end.measured),
    ] {
        let cpu: Vec<String> = m
            .cpu_us_per_op
            .iter()
            .map(|(group, us)| format!("{group} {us:.1}"))
            .collect();
        let _ = writeln!(
            out,
            "| {name} | {} | {:.0} | {} |",
            m.ops,
            m.rate,
            cpu.join(", ")
        );
    }

    let rss: Vec<String> = e2e
        .peak_rss
        .iter()
        .map(|(role, bytes)| format!("{role} {:.1} MB", mb(*bytes)))
        .collect();
    let _ = writeln!(
        out,
        "\nPeak RSS during the end-to-end run (largest process of each role): {}.",
        rss.join(", ")
    );

    let _ = writeln!(
        out,
        "\nIngest latency (one node; fixed rates are open-loop):\n"
    );
    let _ = writeln!(
        out,
        "| offered/s | achieved/s | p50 ms | p90 ms | p99 ms | max ms | errors | null handler p50 / p99 ms |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in &f.ingest_latency {
        let offered = p
            .offered
            .map_or("saturation".to_owned(), |r| format!("{r:.0}"));
        let null = f
            .null_latency
            .iter()
            .find(|n| p.offered.is_some() && n.offered == p.offered)
            .map_or(String::new(), |n| {
                format!("{:.2} / {:.2}", n.p50_ms, n.p99_ms)
            });
        let _ = writeln!(
            out,
            "| {offered} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {null} |",
            p.achieved, p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms, p.errors
        );
    }
    out
}

/// Whether a fixed-rate point is the one at half of saturation.
fn is_half(point: &crate::LatencyPoint, f: &Figures) -> bool {
    let saturation = f.ingest_latency.first().map_or(0.0, |p| p.achieved);
    point
        .offered
        .is_some_and(|r| (r / saturation - 0.5).abs() < 0.01)
}

/// Latency (p50 and p99) against throughput, as an SVG.
pub fn chart(f: &Figures, path: &Path) -> anyhow::Result<()> {
    let mut points: Vec<&crate::LatencyPoint> = f.ingest_latency.iter().collect();
    points.sort_by(|a, b| a.achieved.total_cmp(&b.achieved));
    let mut null: Vec<&crate::LatencyPoint> = f.null_latency.iter().collect();
    null.sort_by(|a, b| a.achieved.total_cmp(&b.achieved));
    let max_x = points.iter().map(|p| p.achieved).fold(1.0, f64::max) * 1.1;
    let max_y = points.iter().map(|p| p.p99_ms).fold(1.0, f64::max) * 1.2;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Ingest latency against throughput (one node, 2 shared cores)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y)?;
    chart
        .configure_mesh()
        .x_desc("durable votes per second")
        .y_desc("latency (ms)")
        .draw()?;
    let p50 = (|p: &crate::LatencyPoint| p.p50_ms) as fn(&crate::LatencyPoint) -> f64;
    let p99 = (|p: &crate::LatencyPoint| p.p99_ms) as fn(&crate::LatencyPoint) -> f64;
    for (label, color, source, pick) in [
        ("ingest p50", BLUE, &points, p50),
        ("ingest p99", RED, &points, p99),
        ("null handler p99 (ceiling)", GREEN, &null, p99),
    ] {
        let series: Vec<(f64, f64)> = source.iter().map(|p| (p.achieved, pick(p))).collect();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        chart.draw_series(
            series
                .into_iter()
                .map(|xy| Circle::new(xy, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}
