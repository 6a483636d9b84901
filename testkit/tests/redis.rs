//! Integration tests of the redis-server launcher (needs `redis-server` on PATH).

use mailroute_testkit::RedisServer;

fn ping(server: &RedisServer) -> anyhow::Result<String> {
    let mut con = server.client()?.get_connection()?;
    Ok(redis::cmd("PING").query(&mut con)?)
}

#[test]
fn starts_and_answers_ping() -> anyhow::Result<()> {
    let server = RedisServer::start()?;
    assert_eq!(server.url(), format!("redis://127.0.0.1:{}/", server.port()));
    assert_eq!(ping(&server)?, "PONG");

    let other = RedisServer::start()?;
    assert_ne!(other.port(), server.port());
    assert_eq!(ping(&other)?, "PONG");
    Ok(())
}

#[tokio::test]
async fn async_client_works() -> anyhow::Result<()> {
    let server = RedisServer::start()?;
    let mut con = server.client()?.get_multiplexed_async_connection().await?;
    let () = redis::cmd("SET").arg("k").arg("v").query_async(&mut con).await?;
    let v: String = redis::cmd("GET").arg("k").query_async(&mut con).await?;
    assert_eq!(v, "v");
    Ok(())
}

#[test]
fn aof_restart_keeps_data() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = RedisServer::builder().aof(true).dir(dir.path()).start()?;
    let port = server.port();
    let client = server.client()?;
    let mut con = client.get_connection()?;
    let () = redis::cmd("SET").arg("before").arg("graceful").query(&mut con)?;
    drop(con);

    server.restart()?;
    assert_eq!(server.port(), port);
    let mut con = client.get_connection()?;
    let v: String = redis::cmd("GET").arg("before").query(&mut con)?;
    assert_eq!(v, "graceful");

    // A crash (SIGKILL) loses nothing either with appendfsync always.
    let () = redis::cmd("SET").arg("crash").arg("survives").query(&mut con)?;
    drop(con);
    server.kill();
    assert!(!server.is_running());
    server.restart()?;
    let mut con = client.get_connection()?;
    let v: String = redis::cmd("GET").arg("crash").query(&mut con)?;
    assert_eq!(v, "survives");
    Ok(())
}

#[test]
fn drop_kills_the_server() -> anyhow::Result<()> {
    let server = RedisServer::start()?;
    let addr = server.addr();
    let pid = server.pid().expect("running");
    drop(server);
    assert!(std::net::TcpStream::connect(addr).is_err());
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    Ok(())
}
