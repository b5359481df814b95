/**
 * `npm run demo`: the gateway in embedded mode (inventory from a file, leases in memory: no MariaDB,
 * no Redis) in front of a simulated Ollama and a simulated Stable Diffusion server on local ports,
 * and a few curl lines to try. Ctrl-C stops everything.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import Fastify, { LogController, type FastifyInstance } from 'fastify'
import maestro from '../app.js'
import { gatewayRequestId } from '../services/http/exchange.js'
import { startDiffusionSimulator, startSimulator, type Simulator } from './simulator/upstream-simulator.js'

export interface DemoOptions {
  /** The gateway's port; 0 picks a free one. A busy port falls back to a free one too. */
  port?: number
  /** Log to stdout (pretty on a terminal); the test keeps it quiet. */
  log?: boolean
}

export interface Demo {
  url: string
  app: FastifyInstance
  ollama: Simulator
  diffusion: Simulator
  close: () => Promise<void>
}

export const DEMO_LLM = 'llama3.2'
export const DEMO_DIFFUSOR = 'sd-turbo'

export async function startDemo (options: DemoOptions = {}): Promise<Demo> {
  // Tokens slow enough to watch a stream arrive; an image takes a second.
  const ollama = await startSimulator({ models: [`${DEMO_LLM}:latest`, 'qwen2.5:0.5b'], tokens: 40, tokenDelayMs: 60, gpuIds: ['1'] })
  const diffusion = await startDiffusionSimulator({ imageDelayMs: 1000, gpuIds: ['2'] })
  const dir = await mkdtemp(join(tmpdir(), 'maestro-demo-'))
  const inventoryFile = join(dir, 'inventory.json')
  await writeFile(inventoryFile, JSON.stringify({
    computers: [{ id: 1, name: 'this machine', ip: '127.0.0.1' }],
    gpus: [{ id: 1, computer: 1, name: 'simulated GPU 1', weight: 1 }, { id: 2, computer: 1, name: 'simulated GPU 2', weight: 1 }],
    assignments: [
      { id: 1, name: 'simulated-ollama', model: '*', kind: 'llm', port: ollama.port, gpus: [1] },
      { id: 2, name: 'simulated-diffusion', model: DEMO_DIFFUSOR, kind: 'diffusor', port: diffusion.port, gpus: [2] }
    ]
  }, null, 2))

  // Embedded mode whatever this shell has configured.
  for (const v of ['MARIADB_URL', 'ConnectionStrings__MariaDb', 'REDIS_URL', 'ConnectionStrings__Redis']) delete process.env[v]
  const app = Fastify({
    logger: options.log === true
      ? { level: 'info', ...(process.stdout.isTTY ? { transport: { target: 'pino-pretty', options: { translateTime: 'HH:MM:ss.l', singleLine: true } } } : {}) }
      : false,
    logController: new LogController({ disableRequestLogging: true }),
    genReqId: gatewayRequestId
  })
  const close = async (): Promise<void> => {
    await app.close()
    await Promise.all([ollama.close(), diffusion.close()])
    await rm(dir, { recursive: true, force: true })
  }
  try {
    await app.register(maestro, { dotenv: false, INVENTORY_FILE: inventoryFile })
    try {
      await app.listen({ port: options.port ?? 5000, host: '127.0.0.1' })
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EADDRINUSE') throw err
      await app.listen({ port: 0, host: '127.0.0.1' })
    }
  } catch (err) {
    await close()
    throw err
  }
  const address = app.server.address()
  const url = `http://127.0.0.1:${typeof address === 'object' && address != null ? address.port : 0}`
  return { url, app, ollama, diffusion, close }
}

/** What to type in another terminal. */
export function tryLines (url: string): string {
  return [
    '',
    `AI Maestro Proxy demo: the gateway on ${url}, in front of a simulated Ollama and Stable Diffusion`,
    '(embedded mode: inventory from a file, leases in memory). Try, in another terminal:',
    '',
    '  # a chat, streamed token by token',
    `  curl -N ${url}/api/chat -d '{"model":"${DEMO_LLM}","messages":[{"role":"user","content":"Why is the sky blue?"}]}'`,
    '',
    '  # three requests for one GPU: they queue and run one after another',
    `  for i in 1 2 3; do curl -s -o /dev/null -w "%{time_total}s\\n" ${url}/api/generate -d '{"model":"${DEMO_LLM}","prompt":"hi","stream":false}' & done; wait`,
    '',
    '  # an image (a small PNG)',
    `  curl -s ${url}/txt2img -d '{"model":"${DEMO_DIFFUSOR}","prompt":"a lighthouse at dusk"}' -o image.png && file image.png`,
    '',
    '  # who holds which GPU, and the queues',
    `  curl -s ${url}/gpu/status`,
    '',
    '  # Prometheus metrics',
    `  curl -s ${url}/metrics | grep ^maestro_`,
    '',
    '  # the operator console, in a browser: the GPUs, queues and last requests, live',
    `  ${url}/ui/`,
    '',
    'Ctrl-C stops the demo.',
    ''
  ].join('\n')
}

async function main (): Promise<void> {
  const demo = await startDemo({ port: Number(process.env.PORT ?? 5000), log: true })
  process.stdout.write(tryLines(demo.url) + '\n')
  const stop = (): void => {
    demo.close().then(() => process.exit(0), () => process.exit(1))
  }
  process.once('SIGINT', stop)
  process.once('SIGTERM', stop)
}

if (process.argv[1] != null && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err: unknown) => {
    process.stderr.write(`demo failed: ${(err as Error).message}\n`)
    process.exit(1)
  })
}
