import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { answers, randomPort } from './redis-processes.js'

type Teardown = { teardown: (fn: () => unknown) => void }

/** A redis-server of the test's own (never the shared one), which it can kill and start again. */
export interface PrivateRedis {
  url: string
  port: number
  /** SIGKILL: what is not in a snapshot is gone. */
  kill: () => Promise<void>
  /** Start again on the same port: empty, or from the last SAVE when `snapshots` was asked for. */
  start: () => Promise<void>
}

/**
 * The port is bound by redis-server itself (no port picked free, then bound later: another test
 * file's process could take it in between), and only a server that reports this child's pid counts
 * as started, so a Redis of another test already on that port is never mistaken for this one.
 * A port found taken at the first start is given up for another.
 */
export async function privateRedis (t: Teardown, opts: { snapshots?: boolean } = {}): Promise<PrivateRedis> {
  const dir = await mkdtemp(join(tmpdir(), 'maestro-redis-'))
  let port = 0
  let child: ChildProcess | undefined
  const kill = async (): Promise<void> => {
    const proc = child
    if (proc == null || proc.exitCode != null || proc.signalCode != null) return
    proc.kill('SIGKILL')
    await once(proc, 'exit')
  }
  t.teardown(async () => {
    await kill()
    await rm(dir, { recursive: true, force: true })
  })
  /** 'taken' when redis-server could not bind the port. */
  const spawnOn = async (p: number): Promise<'started' | 'taken'> => {
    // snapshots only by an explicit SAVE (never on a timer): the test decides what a restart restores
    const args = ['--port', String(p), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--daemonize', 'no',
      '--loglevel', 'warning', '--dir', dir, '--dbfilename', opts.snapshots === true ? 'dump.rdb' : 'never.rdb']
    const proc = spawn('redis-server', args, { stdio: ['ignore', 'pipe', 'pipe'] })
    child = proc
    let output = ''
    proc.stdout?.on('data', (d: Buffer) => { output += d.toString() })
    proc.stderr?.on('data', (d: Buffer) => { output += d.toString() })
    const deadline = Date.now() + 10_000
    while (Date.now() < deadline && proc.exitCode == null) {
      if (await answers(p, proc.pid)) return 'started'
      await sleep(10)
    }
    await kill()
    if (/Address already in use/i.test(output)) return 'taken'
    throw new Error(`redis-server did not start on port ${p}: ${output.slice(-500)}`)
  }
  for (let attempt = 0; ; attempt++) {
    port = randomPort()
    if (await spawnOn(port) === 'started') break
    if (attempt === 9) throw new Error('redis-server: no free port found')
  }
  const start = async (): Promise<void> => {
    if (await spawnOn(port) === 'taken') throw new Error(`redis-server: port ${port} was taken by another process while this one was down`)
  }
  return { url: `redis://127.0.0.1:${port}`, port, kill, start }
}
