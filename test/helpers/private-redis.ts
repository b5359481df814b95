import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { mkdtemp, rm } from 'node:fs/promises'
import net from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis } from 'ioredis'

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

async function freePort (): Promise<number> {
  const server = net.createServer()
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const port = (server.address() as net.AddressInfo).port
  await new Promise((resolve) => server.close(resolve))
  return port
}

export async function privateRedis (t: Teardown, opts: { snapshots?: boolean } = {}): Promise<PrivateRedis> {
  const port = await freePort()
  const dir = await mkdtemp(join(tmpdir(), 'maestro-redis-'))
  let child: ChildProcess | undefined
  const start = async (): Promise<void> => {
    // snapshots only by an explicit SAVE (never on a timer): the test decides what a restart restores
    const args = ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--daemonize', 'no',
      '--loglevel', 'warning', '--dir', dir, '--dbfilename', opts.snapshots === true ? 'dump.rdb' : 'never.rdb']
    const proc = spawn('redis-server', args, { stdio: 'ignore' })
    child = proc
    for (let i = 0; ; i++) {
      if (proc.exitCode != null) throw new Error(`redis-server exited with ${proc.exitCode}`)
      const probe = new Redis(port, '127.0.0.1', { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null })
      try {
        await probe.connect()
        if (await probe.ping() === 'PONG') return
      } catch {
        if (i > 500) throw new Error('redis-server did not answer')
        await sleep(10)
      } finally {
        probe.disconnect()
      }
    }
  }
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
  await start()
  return { url: `redis://127.0.0.1:${port}`, port, kill, start }
}
