/**
 * Real Redis processes for the high-availability tests: servers, replicas, sentinels and a
 * cluster, each in its own temporary directory, on a port the process binds itself (a random
 * one, tried again when taken). Every process is killed at the end of the test, failed or not,
 * and when the test process exits.
 */
import { spawn, execFile, execFileSync, type ChildProcess } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis } from 'ioredis'

type Teardown = { teardown: (fn: () => unknown) => void }

export interface RedisProcess {
  port: number
  proc: ChildProcess
  dir: string
  /** SIGKILL, and wait for the exit. */
  kill: () => Promise<void>
  /**
   * After `kill`: the same binary again with the same config file, port and directory (a Cluster
   * node finds its `nodes.conf` there: same node id, same slots), answering once this resolves.
   * `proc` is then the new process.
   */
  restart: () => Promise<void>
}

const running = new Set<ChildProcess>()
process.on('exit', () => { for (const p of running) p.kill('SIGKILL') })

const run = promisify(execFile)

export function randomPort (): number {
  // Below the ephemeral range, with room for a Cluster's bus port (port + 10000).
  return 20000 + Math.floor(Math.random() * 9000)
}

/** The process `pid` answers on `port` (not another test's Redis that got there first). */
export async function answers (port: number, pid: number | undefined, password?: string): Promise<boolean> {
  const c = new Redis({ port, host: '127.0.0.1', password, lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null })
  try {
    await c.connect()
    return (await c.info('server')).includes(`process_id:${pid ?? -1}\r\n`)
  } catch {
    return false
  } finally {
    c.disconnect()
  }
}

/**
 * Start `binary` with a config file (written to a fresh directory) on a port it binds itself;
 * `config(port, dir)` gives the file's text, `args` follow the file on the command line and
 * `password` is what the process asks its clients for (`requirepass`). Retried on another port
 * when that one is taken.
 */
async function startProcess (t: Teardown, binary: string, config: (port: number, dir: string) => string,
  args: string[] = [], password?: string): Promise<RedisProcess> {
  for (let attempt = 0; attempt < 10; attempt++) {
    const port = randomPort()
    const dir = mkdtempSync(join(tmpdir(), 'maestro-redis-'))
    const file = join(dir, 'redis.conf')
    writeFileSync(file, config(port, dir))
    let output = ''
    let proc!: ChildProcess
    let exited!: Promise<void>
    const launch = (): void => {
      const p = spawn(binary, [file, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
      running.add(p)
      p.stdout?.on('data', (d: Buffer) => { output += d.toString() })
      p.stderr?.on('data', (d: Buffer) => { output += d.toString() })
      exited = new Promise<void>((resolve) => p.once('exit', () => { running.delete(p); resolve() }))
      proc = p
    }
    const kill = async (): Promise<void> => {
      if (proc.exitCode == null && proc.signalCode == null) proc.kill('SIGKILL')
      await exited
    }
    const up = async (): Promise<boolean> => {
      const deadline = Date.now() + 10_000
      while (Date.now() < deadline && proc.exitCode == null && !(await answers(port, proc.pid, password))) await sleep(20)
      return proc.exitCode == null && await answers(port, proc.pid, password)
    }
    launch()
    t.teardown(async () => {
      await kill()
      rmSync(dir, { recursive: true, force: true })
    })
    const restart = async (): Promise<void> => {
      await kill()
      output = ''
      launch()
      if (!(await up())) throw new Error(`${binary} did not start again on ${port}: ${output.slice(-500)}`)
    }
    if (await up()) return { port, get proc () { return proc }, dir, kill, restart }
    await kill()
    if (!/Address already in use/i.test(output)) throw new Error(`${binary} did not start: ${output.slice(-500)}`)
  }
  throw new Error(`${binary}: no free port found`)
}

const DATA_NODE = (port: number, dir: string): string =>
  `port ${port}\nbind 127.0.0.1\ndir ${dir}\nsave ""\nappendonly no\nprotected-mode no\n`

/** A standalone Redis server; `extra` lines go into its config file; `password` is its `requirepass`. */
export async function startRedisServer (t: Teardown, extra = '', password?: string): Promise<RedisProcess> {
  const auth = password != null ? `requirepass ${password}\nmasterauth ${password}\n` : ''
  return await startProcess(t, 'redis-server', (port, dir) => DATA_NODE(port, dir) + auth + extra, [], password)
}

/**
 * Debian's `redis-sentinel` package only adds a `redis-sentinel` name for the server binary,
 * which runs as a sentinel with `--sentinel` too: use that when the package is not installed.
 */
function sentinelCommand (): { binary: string, args: string[] } {
  try {
    execFileSync('redis-sentinel', ['--version'], { stdio: 'ignore' })
    return { binary: 'redis-sentinel', args: [] }
  } catch {
    return { binary: 'redis-server', args: ['--sentinel'] }
  }
}

export interface SentinelSetup {
  master: RedisProcess
  replica: RedisProcess
  sentinels: RedisProcess[]
  /** The master group name the sentinels watch. */
  name: string
  /** `REDIS_SENTINELS` for the gateway. */
  addresses: string
  /** The master's port as the first sentinel tells it now. */
  masterPort: () => Promise<number>
}

export interface SentinelAuth {
  /** `requirepass` (and `masterauth`) of the master and the replica; the sentinels' `auth-pass`. */
  password?: string
  /** `requirepass` of the sentinels. */
  sentinelPassword?: string
}

/**
 * A master, one replica and three sentinels (quorum 2) that call a master down after
 * `downAfterMs` without an answer; with `auth`, every one of them asks for a password.
 */
export async function startSentinelSetup (t: Teardown, downAfterMs = 1000, auth: SentinelAuth = {}): Promise<SentinelSetup> {
  const name = 'maestro-test'
  const { password, sentinelPassword } = auth
  const master = await startRedisServer(t, '', password)
  const replica = await startRedisServer(t, `replicaof 127.0.0.1 ${master.port}\n`, password)
  const m = new Redis({ port: master.port, password, lazyConnect: true })
  await m.connect()
  try {
    // The replica has its first copy before the sentinels look: they learn replicas from the master.
    for (let i = 0; i < 500; i++) {
      const info = await m.info('replication')
      if (/slave0:.*state=online/.test(info)) break
      await sleep(20)
    }
  } finally {
    m.disconnect()
  }
  const sentinels: RedisProcess[] = []
  const sentinel = sentinelCommand()
  for (let i = 0; i < 3; i++) {
    sentinels.push(await startProcess(t, sentinel.binary, (port, dir) => [
      `port ${port}`, 'bind 127.0.0.1', `dir ${dir}`, 'protected-mode no',
      `sentinel monitor ${name} 127.0.0.1 ${master.port} 2`,
      `sentinel down-after-milliseconds ${name} ${downAfterMs}`,
      `sentinel failover-timeout ${name} 5000`,
      `sentinel parallel-syncs ${name} 1`,
      // The sentinels log in to the data nodes with auth-pass, and to each other with their requirepass.
      ...(password != null ? [`sentinel auth-pass ${name} ${password}`] : []),
      ...(sentinelPassword != null ? [`requirepass ${sentinelPassword}`] : []), ''
    ].join('\n'), sentinel.args, sentinelPassword))
  }
  const masterPort = async (): Promise<number> => {
    const s = new Redis({ port: sentinels[0].port, password: sentinelPassword, lazyConnect: true })
    await s.connect()
    try {
      const [, port] = await s.call('SENTINEL', 'get-master-addr-by-name', name) as [string, string]
      return Number(port)
    } finally {
      s.disconnect()
    }
  }
  // Every sentinel sees the others and the replica before the test starts killing things.
  for (const s of sentinels) {
    const c = new Redis({ port: s.port, password: sentinelPassword, lazyConnect: true })
    await c.connect()
    try {
      for (let i = 0; ; i++) {
        const info = await c.call('SENTINEL', 'master', name) as string[]
        const field = (k: string): number => Number(info[info.indexOf(k) + 1])
        if (field('num-other-sentinels') === 2 && field('num-slaves') === 1) break
        if (i > 1000) throw new Error('sentinels did not find each other')
        await sleep(20)
      }
    } finally {
      c.disconnect()
    }
  }
  return { master, replica, sentinels, name, addresses: sentinels.map((s) => `127.0.0.1:${s.port}`).join(','), masterPort }
}

export interface ClusterSetup {
  nodes: RedisProcess[]
  /** `REDIS_CLUSTER_NODES` for the gateway. */
  addresses: string
}

/** Three masters with `cluster-enabled yes` and no replicas, slots spread by `redis-cli --cluster create`. */
export async function startRedisCluster (t: Teardown): Promise<ClusterSetup> {
  const nodes: RedisProcess[] = []
  for (let i = 0; i < 3; i++) {
    nodes.push(await startProcess(t, 'redis-server', (port, dir) => DATA_NODE(port, dir) +
      `cluster-enabled yes\ncluster-config-file ${join(dir, 'nodes.conf')}\ncluster-node-timeout 2000\n`))
  }
  const addresses = nodes.map((n) => `127.0.0.1:${n.port}`)
  await run('redis-cli', ['--cluster', 'create', ...addresses, '--cluster-replicas', '0', '--cluster-yes'])
  // Created: wait until every node agrees the cluster is up.
  for (const n of nodes) {
    const c = new Redis({ port: n.port, lazyConnect: true })
    await c.connect()
    try {
      for (let i = 0; !/cluster_state:ok/.test(await c.call('CLUSTER', 'INFO') as string); i++) {
        if (i > 500) throw new Error('cluster did not come up')
        await sleep(20)
      }
    } finally {
      c.disconnect()
    }
  }
  return { nodes, addresses: addresses.join(',') }
}
