use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, FileExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;

/// A backing folder and a mount point in a temporary folder that other users can enter
/// (PostgreSQL runs as `postgres`).
struct Dirs {
    tmp: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::Builder::new()
        .prefix("lazyfs-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let backing = tmp.path().join("disk");
    let mnt = tmp.path().join("mnt");
    for dir in [&backing, &mnt] {
        std::fs::DirBuilder::new().mode(0o755).create(dir).unwrap();
    }
    Dirs { tmp, backing, mnt }
}

#[test]
fn fsynced_data_survives_a_power_cut_and_unsynced_data_does_not() {
    let d = dirs();
    let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();

    let mut synced = File::create(d.mnt.join("synced")).unwrap();
    synced.write_all(b"durable").unwrap();
    synced.sync_all().unwrap();
    std::fs::write(d.mnt.join("unsynced"), b"volatile").unwrap();
    let mut prefix = File::create(d.mnt.join("prefix")).unwrap();
    prefix.write_all(b"first").unwrap();
    prefix.sync_data().unwrap();
    prefix.write_all(b" second").unwrap();
    drop((synced, prefix));

    // Programs see their writes at once; the disk has only what was fsynced.
    assert_eq!(std::fs::read(d.mnt.join("unsynced")).unwrap(), b"volatile");
    assert_eq!(
        std::fs::read(d.mnt.join("prefix")).unwrap(),
        b"first second"
    );
    assert_eq!(std::fs::metadata(d.mnt.join("prefix")).unwrap().len(), 12);
    assert_eq!(std::fs::read(d.backing.join("unsynced")).unwrap(), b"");
    assert_eq!(std::fs::read(d.backing.join("prefix")).unwrap(), b"first");

    let report = fs.power_cut().unwrap();
    assert_eq!(
        report.files,
        [PathBuf::from("prefix"), PathBuf::from("unsynced")]
    );
    assert_eq!(report.bytes, 12 + 8, "whole files here, each under a page");

    assert_eq!(std::fs::read(d.backing.join("synced")).unwrap(), b"durable");
    assert_eq!(std::fs::read(d.backing.join("unsynced")).unwrap(), b"");
    assert_eq!(std::fs::read(d.backing.join("prefix")).unwrap(), b"first");
    assert!(
        std::fs::read_dir(&d.mnt).unwrap().next().is_none(),
        "the mount point is empty again after the cut"
    );

    let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
    assert_eq!(std::fs::read(d.mnt.join("prefix")).unwrap(), b"first");
    assert_eq!(std::fs::read(d.mnt.join("synced")).unwrap(), b"durable");
    fs.unmount().unwrap();
}

#[test]
fn a_power_cut_tears_down_a_mount_that_is_still_in_use() {
    let d = dirs();
    let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
    let mut open = File::create(d.mnt.join("held")).unwrap();
    open.write_all(b"never synced").unwrap();
    let report = fs.power_cut().unwrap();
    assert_eq!(report.files, [PathBuf::from("held")]);
    // The disk is gone under the process that still holds the file.
    assert!(open.write_all(b"more").is_err());
    assert!(open.sync_all().is_err());
    drop(open);
    assert_eq!(std::fs::read(d.backing.join("held")).unwrap(), b"");
    // The mount point is free again.
    let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
    assert_eq!(std::fs::read(d.mnt.join("held")).unwrap(), b"");
    fs.unmount().unwrap();
}

/// The reliability harness starts every role on a host with `ip netns exec`, which gives the
/// role a mount namespace of its own, a copy of ours taken at its start: copies of every
/// LazyFs mounted then, which our unmount does not reach (this machine's `/` is private, so
/// nothing propagates). Such a copy keeps the FUSE connection alive, and a power cut used to
/// wait [`STOP_TIMEOUT`] for request threads that never stopped: 10 s per disk, 40 s of the
/// harness's power-loss fault.
#[test]
fn a_power_cut_is_quick_and_final_while_another_mount_namespace_holds_a_copy() {
    let d = dirs();
    let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
    std::fs::write(d.mnt.join("unsynced"), b"volatile").unwrap();
    // What `ip netns exec` does: unshare(CLONE_NEWNS), then `/` made a slave.
    let mut copy = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "slave", "sleep", "60"])
        .spawn()
        .unwrap();
    let mnt = d.mnt.canonicalize().unwrap();
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let mut backoff = landslide_patience::Backoff::constant(Duration::from_millis(10))
        .within(Duration::from_secs(10), "unshare to copy the mount");
    while std::fs::read_link(format!("/proc/{}/ns/mnt", copy.id())).unwrap() == ours
        || !std::fs::read_to_string(format!("/proc/{}/mountinfo", copy.id()))
            .unwrap()
            .contains(mnt.to_str().unwrap())
    {
        assert!(
            backoff.wait_blocking().is_ok(),
            "unshare never copied the mount"
        );
    }

    let started = Instant::now();
    let report = fs.power_cut().unwrap();
    let took = started.elapsed();
    assert_eq!(report.files, [PathBuf::from("unsynced")]);
    assert!(
        took < Duration::from_secs(2),
        "the power cut took {took:?}: it waited for the copy's connection"
    );
    // Nothing written through the copy reaches the disk after the cut.
    let write = std::process::Command::new("nsenter")
        .arg(format!("--target={}", copy.id()))
        .args(["--mount", "sh", "-c"])
        .arg(format!("echo late > {}/late", mnt.display()))
        .status()
        .unwrap();
    assert!(!write.success(), "a write through the copy succeeded");
    assert!(!d.backing.join("late").exists());
    assert_eq!(std::fs::read(d.backing.join("unsynced")).unwrap(), b"");
    copy.kill().unwrap();
    copy.wait().unwrap();
}

#[test]
fn a_clean_unmount_writes_everything_back() {
    let d = dirs();
    let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
    std::fs::create_dir_all(d.mnt.join("a/b")).unwrap();
    std::fs::write(d.mnt.join("a/b/file"), b"kept by a clean shutdown").unwrap();
    for line in ["one\n", "two\n"] {
        let mut log = OpenOptions::new()
            .append(true)
            .create(true)
            .open(d.mnt.join("a/log"))
            .unwrap();
        log.write_all(line.as_bytes()).unwrap();
    }
    assert_eq!(std::fs::read(d.mnt.join("a/log")).unwrap(), b"one\ntwo\n");
    let space = nix::sys::statvfs::statvfs(&d.mnt).unwrap();
    assert!(space.blocks() > 0 && space.files() > 0);
    assert_eq!(std::fs::read(d.backing.join("a/b/file")).unwrap(), b"");
    fs.unmount().unwrap();
    assert_eq!(
        std::fs::read(d.backing.join("a/b/file")).unwrap(),
        b"kept by a clean shutdown"
    );
    assert_eq!(
        std::fs::read(d.backing.join("a/log")).unwrap(),
        b"one\ntwo\n"
    );

    // Busy: written back all the same, unmounted by force, and said so.
    let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
    let mut open = File::create(d.mnt.join("a/busy")).unwrap();
    open.write_all(b"written back").unwrap();
    let error = fs.unmount().unwrap_err();
    assert!(error.to_string().contains("still in use"), "{error:#}");
    assert_eq!(
        std::fs::read(d.backing.join("a/busy")).unwrap(),
        b"written back"
    );
    assert!(open.write_all(b"more").is_err());
}

#[test]
fn reads_merge_unsynced_pages_over_the_file_through_overwrites_and_truncation() {
    let d = dirs();
    let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
    let path = d.mnt.join("pages");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    // What the file must read as, kept beside it.
    let mut model: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    file.write_all_at(&model, 0).unwrap();
    file.sync_all().unwrap();
    let synced = model.clone();

    // Across page boundaries, past the end, then cut back into a dirty page.
    let patch = vec![0xAA; 5000];
    file.write_all_at(&patch, 3000).unwrap();
    model[3000..8000].copy_from_slice(&patch);
    file.write_all_at(b"tail", 12_000).unwrap();
    model.resize(12_000, 0);
    model.extend_from_slice(b"tail");
    assert_eq!(std::fs::read(&path).unwrap(), model);
    file.set_len(9000).unwrap();
    model.truncate(9000);
    assert_eq!(std::fs::read(&path).unwrap(), model);
    // Growing again shows zeros, not the bytes cut off.
    file.set_len(13_000).unwrap();
    model.resize(13_000, 0);
    assert_eq!(std::fs::read(&path).unwrap(), model);
    let mut odd = vec![0; 777];
    let n = file.read_at(&mut odd, 8_500).unwrap();
    assert_eq!(&odd[..n], &model[8_500..8_500 + n]);
    drop(file);

    // The truncation was durable at once, the writes were not.
    let report = fs.power_cut().unwrap();
    assert_eq!(report.files, [PathBuf::from("pages")]);
    let mut disk = synced;
    disk.truncate(9000);
    disk.resize(13_000, 0);
    assert_eq!(std::fs::read(d.backing.join("pages")).unwrap(), disk);
}

#[test]
fn unsynced_data_follows_its_file_through_a_rename_and_dies_with_it() {
    let d = dirs();
    let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
    std::fs::create_dir(d.mnt.join("dir")).unwrap();
    std::fs::write(d.mnt.join("dir/tmp"), b"meta v2").unwrap();
    std::fs::write(d.mnt.join("dir/meta"), b"meta v1").unwrap();
    // Write, rename over the old file, then fsync under the new name: nats-server's way.
    std::fs::rename(d.mnt.join("dir/tmp"), d.mnt.join("dir/meta")).unwrap();
    std::fs::rename(d.mnt.join("dir"), d.mnt.join("moved")).unwrap();
    File::open(d.mnt.join("moved/meta"))
        .unwrap()
        .sync_all()
        .unwrap();
    std::fs::write(d.mnt.join("moved/gone"), b"deleted before the cut").unwrap();
    std::fs::remove_file(d.mnt.join("moved/gone")).unwrap();
    let names: Vec<_> = std::fs::read_dir(d.mnt.join("moved"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["meta"]);

    let report = fs.power_cut().unwrap();
    assert_eq!(report, CutReport::default(), "nothing unsynced was left");
    assert_eq!(
        std::fs::read(d.backing.join("moved/meta")).unwrap(),
        b"meta v2"
    );
}

#[test]
fn new_entries_belong_to_the_user_who_made_them() {
    let d = dirs();
    let user = nix::unistd::User::from_name("postgres")
        .unwrap()
        .expect("this test runs a shell as the `postgres` user, which must exist");
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    std::os::unix::fs::chown(&d.backing, Some(uid), Some(gid)).unwrap();
    let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
    let status = std::process::Command::new("sh")
        .args([
            "-c",
            "umask 077 && mkdir d && echo x > d/f && ln -s f d/l && mv d/f d/g",
        ])
        .current_dir(&d.mnt)
        .uid(uid)
        .gid(gid)
        .status()
        .unwrap();
    assert!(status.success());
    for (name, mode) in [("d", 0o700), ("d/g", 0o600)] {
        let meta = std::fs::metadata(d.backing.join(name)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{name}");
        assert_eq!(meta.mode() & 0o7777, mode, "{name}");
    }
    let link = std::fs::symlink_metadata(d.backing.join("d/l")).unwrap();
    assert_eq!(link.uid(), uid);
    // Root's files stay out of the user's reach, as on the backing disk.
    std::fs::write(d.mnt.join("root-only"), b"secret").unwrap();
    std::fs::set_permissions(
        d.mnt.join("root-only"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::chown(d.mnt.join("root-only"), Some(0), Some(0)).unwrap();
    let status = std::process::Command::new("cat")
        .arg("root-only")
        .current_dir(&d.mnt)
        .uid(uid)
        .gid(gid)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "default_permissions refused the read");
    fs.unmount().unwrap();
}

#[test]
fn fsynced_small_writes_reach_the_backing_file() {
    const WRITES: usize = 500;
    let d = dirs();
    let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
    let block: Vec<u8> = (0..4096u32).map(|i| (i % 241) as u8).collect();
    let mut rates = Vec::new();
    for dir in [&d.mnt, &d.backing] {
        let mut file = File::create(dir.join(format!("log-{}", rates.len()))).unwrap();
        let started = Instant::now();
        for _ in 0..WRITES {
            file.write_all(&block).unwrap();
            file.sync_data().unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        rates.push((WRITES * block.len()) as f64 / secs / 1e6);
    }
    eprintln!(
        "fsynced 4 KiB writes: {:.1} MB/s through LazyFs, {:.1} MB/s on the backing folder",
        rates[0], rates[1]
    );
    let big = vec![7u8; 1 << 20];
    let mut file = File::create(d.mnt.join("big")).unwrap();
    let started = Instant::now();
    for _ in 0..64 {
        file.write_all(&big).unwrap();
    }
    eprintln!(
        "unsynced 1 MiB writes: {:.0} MB/s through LazyFs",
        64.0 * big.len() as f64 / started.elapsed().as_secs_f64() / 1e6
    );
    drop(file);
    let report = fs.power_cut().unwrap();
    assert_eq!(report.files, [PathBuf::from("big")]);
    assert_eq!(report.bytes, 64 << 20);
    let disk = std::fs::read(d.backing.join("log-0")).unwrap();
    assert_eq!(disk.len(), WRITES * block.len());
    assert!(disk.chunks(block.len()).all(|c| c == block));
    assert_eq!(std::fs::metadata(d.backing.join("big")).unwrap().len(), 0);
}

/// Publishes `MESSAGES` acked messages to a file stream of a nats-server whose store is on
/// LazyFs, kills the server (SIGKILL), cuts the power, mounts the disk again and restarts the
/// server; returns how many messages the restarted server has, the last one's payload, and
/// what the cut threw away.
async fn nats_through_a_power_cut(sync: crate::Sync) -> (u64, Option<String>, CutReport) {
    use async_nats::jetstream::{self, stream};
    let d = dirs();
    let run = d.tmp.path().join("run");
    std::fs::create_dir(&run).unwrap();
    // The store is a symlink into the mount, so that the config, log and pid file stay on the
    // real disk: the config was never fsynced, the cut would empty it.
    std::os::unix::fs::symlink(&d.mnt, run.join("nats")).unwrap();
    let mut spec = crate::NatsSpec::new(crate::NatsLayout::Single);
    spec.sync = sync;
    spec.stems = Some(vec!["nats".to_owned()]);

    let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
    let mut nats = crate::Nats::start_with(&spec, &run).await.unwrap();
    let js = jetstream::new(nats.client(landslide_nats::User::Admin).await.unwrap());
    js.create_stream(stream::Config {
        name: "LAZY".to_owned(),
        subjects: vec!["lazy.>".to_owned()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..MESSAGES {
        let ack = js
            .publish("lazy.votes", i.to_string().into())
            .await
            .unwrap();
        ack.await.unwrap();
    }
    nats.kill(0).await.unwrap();
    let report = tokio::task::spawn_blocking(move || fs.power_cut())
        .await
        .unwrap()
        .unwrap();

    let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
    nats.restart(0)
        .await
        .expect("nats-server starts again on the disk the power cut left");
    let js = jetstream::new(nats.client(landslide_nats::User::Admin).await.unwrap());
    let (messages, last) = match js.get_stream("LAZY").await {
        Ok(mut stream) => {
            let messages = stream.info().await.unwrap().state.messages;
            let last = stream
                .get_last_raw_message_by_subject("lazy.votes")
                .await
                .ok()
                .map(|m| String::from_utf8_lossy(&m.payload).into_owned());
            (messages, last)
        }
        // The stream's definition itself was lost.
        Err(_) => (0, None),
    };
    nats.terminate(0, Duration::from_secs(10)).await.unwrap();
    tokio::task::spawn_blocking(move || fs.unmount())
        .await
        .unwrap()
        .unwrap();
    (messages, last, report)
}

const MESSAGES: u64 = 200;

#[tokio::test(flavor = "multi_thread")]
async fn nats_server_that_fsyncs_before_acking_keeps_every_acked_message_through_a_power_cut() {
    let (messages, last, report) = nats_through_a_power_cut(crate::Sync::Always).await;
    eprintln!("sync always: {report}: {:?}", report.files);
    assert_eq!(messages, MESSAGES);
    assert_eq!(last.as_deref(), Some("199"));
}

/// The control: with the server's default (fsync every two minutes) the acked messages are
/// only in memory, and the cut takes them. This is what shows the fault is real.
#[tokio::test(flavor = "multi_thread")]
async fn nats_server_with_its_lazy_default_loses_acked_messages_at_a_power_cut() {
    let (messages, _, report) = nats_through_a_power_cut(crate::Sync::Lazy).await;
    eprintln!(
        "lazy sync: {report}: {:?}; {messages} messages left",
        report.files
    );
    assert!(messages < MESSAGES, "{messages} of {MESSAGES} survived");
    assert!(report.bytes > 0);
}

/// PostgreSQL (as the `postgres` user) with its data folder on LazyFs: initdb, start, commit
/// rows, crash (immediate stop), power cut, start again: crash recovery finds every commit.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_keeps_committed_rows_through_a_crash_and_a_power_cut() {
    use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let d = dirs();
    let spec = crate::postgres::PostgresSpec {
        cluster: d.mnt.join("pg"),
        // Outside the mount, so that the cut does not take the log.
        log: d.tmp.path().join("postgres.log"),
        port: crate::free_port().unwrap(),
        superuser: "postgres".to_owned(),
        place: crate::Place::loopback(),
        access: crate::postgres::PgAccess::default(),
    };
    let bins = crate::Binaries::system().postgres(&spec.cluster).unwrap();
    let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
    let mut pg = crate::Postgres::start_with(spec, bins).await.unwrap();
    pg.create_database("lazy").await.unwrap();
    let mut conn = AsyncPgConnection::establish(&pg.url("lazy")).await.unwrap();
    diesel::sql_query("CREATE TABLE votes (n int)")
        .execute(&mut conn)
        .await
        .unwrap();
    for n in 0..50 {
        diesel::sql_query(format!("INSERT INTO votes VALUES ({n})"))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    drop(conn);
    pg.stop(crate::PgStop::Immediate).await.unwrap();
    let report = tokio::task::spawn_blocking(move || fs.power_cut())
        .await
        .unwrap()
        .unwrap();
    eprintln!("postgres: {report}");

    let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
    pg.start_server().await.unwrap();
    let mut conn = AsyncPgConnection::establish(&pg.url("lazy")).await.unwrap();
    let count: Count = diesel::sql_query("SELECT count(*) AS n FROM votes")
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(count.n, 50);
    drop(conn);
    pg.stop(crate::PgStop::Fast).await.unwrap();
    tokio::task::spawn_blocking(move || fs.unmount())
        .await
        .unwrap()
        .unwrap();
}
