import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { chromium, errors, type BrowserContext, type Locator } from 'playwright-core'

/** Debian's Chromium (`.ci/run` installs it when missing); nothing is downloaded. */
export const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium'

/**
 * A headless Chromium with a fresh profile, closed (and its profile removed) at the end of the
 * test. The flags keep it from calling any host of its own (updates, sync, field trials).
 */
export async function startBrowser (t: { teardown: (fn: () => unknown) => void }): Promise<BrowserContext> {
  const profile = await mkdtemp(join(tmpdir(), 'maestro-chromium-'))
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-dev-shm-usage'],
    viewport: { width: 1400, height: 900 }
  })
  t.teardown(async () => {
    await context.close()
    await rm(profile, { recursive: true, force: true })
  })
  return context
}

/**
 * `locator`'s text once it matches `pattern` (Playwright polls the page for it), or as it is when
 * `ms` have passed: the caller asserts on it, so a state that never comes fails that assertion,
 * with its own message, instead of a timeout. For a read right after an action whose effect the
 * page draws a moment later.
 */
export async function textWhenMatching (locator: Locator, pattern: RegExp | string, ms = 3000): Promise<string> {
  try {
    await locator.filter({ hasText: pattern }).first().waitFor({ timeout: ms })
  } catch (err) {
    if (!(err instanceof errors.TimeoutError)) throw err
  }
  return await locator.textContent() ?? ''
}
