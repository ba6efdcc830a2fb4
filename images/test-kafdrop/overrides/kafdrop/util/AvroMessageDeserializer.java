/*
 * dpe-test/kafdrop (images/test-kafdrop): written for this test image, in place of Kafdrop's class of
 * the same name and constructor, which wraps a Confluent serializer (see ConfluentFormatUnavailable).
 */
package kafdrop.util;

import java.nio.ByteBuffer;

public final class AvroMessageDeserializer implements MessageDeserializer {
  private static final String FORMAT = "AVRO";
  private final String topicName;

  public AvroMessageDeserializer(String topicName, String schemaRegistryUrl, String schemaRegistryAuth) {
    this.topicName = topicName;
  }

  @Override
  public String deserializeMessage(ByteBuffer buffer) {
    throw new ConfluentFormatUnavailable(FORMAT, topicName);
  }
}
