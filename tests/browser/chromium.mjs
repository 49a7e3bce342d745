// The browser every suite here drives: Debian's chromium through
// playwright-core, which never downloads a browser of its own.

import { chromium } from 'playwright-core';

/** Chromium's path: CHROMIUM_BIN, else Debian's package. */
export const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';

/** A headless Chromium (closed by the caller). */
export function launchChromium() {
  return chromium.launch({
    executablePath: CHROMIUM,
    // Root in a container has no user namespace for Chromium's sandbox.
    args: ['--no-sandbox'],
    headless: true,
    timeout: 30_000,
  });
}
